"""ONNX Runtime: sessions per model version, execution provider choice, runs off the event loop.

session.run releases the GIL, so a thread pool sized to the instance count runs batches in
parallel while the asyncio loop keeps serving. Each instance is its own session (own arena),
handed out through an asyncio queue so one batch runs per instance at a time.

This is the only module that knows ONNX Runtime's exception types: a failed run comes out as
a domain error (InvalidInput when ORT rejected the feeds, InternalError otherwise).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from service.errors import InternalError, InvalidInput, ModelLoadError, OutOfMemory, TServeError

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


# ORT's verdicts on a run of a graph that loaded and warmed up: the feeds' shapes, types or
# values (an index past a position table, a length the graph cannot broadcast). The session is
# sound, so the input is the cause: the batcher and the engine re-run a failed batch apart
# first, and what still fails alone is that request's INVALID_ARGUMENT, with ORT's words.
_INPUT_ERRORS = (
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.Fail,
    ort_state.RuntimeException,
    ort_state.NotImplemented,
)
_OOM_SIGNS = ("Failed to allocate memory", "bad_alloc", "out of memory", "CUDA_ERROR_OUT_OF_MEMORY")
# ...except where the device failed, whatever code ORT gave it: a poisoned CUDA context is no 400
_DEVICE_SIGNS = ("CUDA", "CUBLAS", "CUDNN", "cudnn", "cublas", "illegal memory", "TensorRT", "device")


def classify(error: Exception) -> TServeError:
    """The domain error for an exception a run raised. INTERNAL is left for tserve's own faults
    and the device's (EPFail, EngineError, DeviceReset)."""
    if isinstance(error, TServeError):
        return error
    if isinstance(error, MemoryError) or any(s in str(error) for s in _OOM_SIGNS):
        return OutOfMemory(
            f"the run could not allocate the memory it needs; send smaller requests ({str(error)[-160:]})"
        )
    if isinstance(error, _INPUT_ERRORS) and not any(s in str(error) for s in _DEVICE_SIGNS):
        return InvalidInput(f"the model cannot run on this input: ONNX Runtime says {_ort_words(error)}")
    return InternalError(f"inference failed: {type(error).__name__}: {str(error)[:200]}")


def _ort_words(error: Exception) -> str:
    """ORT's message without its status prefix ('[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ')."""
    text = str(error)
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text[:300]


def choose_providers(requested: str, fallback: str) -> list[str]:
    """Providers to ask ONNX Runtime for, applying the fallback policy when one is missing."""
    want = PROVIDERS[requested]
    available = ort.get_available_providers()
    if want in available:
        return [want] if want == "CPUExecutionProvider" else [want, "CPUExecutionProvider"]
    if fallback == "fail":
        raise ModelLoadError(
            f"execution provider {want} is not available (have {available}) and provider_fallback=fail"
        )
    log.warning("execution provider %s is not available (have %s); falling back to CPU", want, available)
    return ["CPUExecutionProvider"]


class OrtRuntime:
    def __init__(
        self,
        model_path: Path,
        providers: list[str],
        instances: int = 1,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        spin: bool = True,
    ) -> None:
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path.name} is missing")
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # Spinning threads wake faster (measured: p50 3.6 vs 5.4 ms at concurrency 1 on 2 cores)
        # but take CPU from the event loop under load (about -10% at concurrency 16).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.sessions = [ort.InferenceSession(str(model_path), so, providers=providers) for _ in range(instances)]
        except Exception as e:  # ORT raises its own exception types for corrupt or invalid graphs
            raise ModelLoadError(f"ONNX Runtime could not load {model_path.name}: {str(e)[:300]}") from e
        # the provider that really runs the graph: the first one the session kept
        self.provider = self.sessions[0].get_providers()[0]
        if self.provider != providers[0]:
            log.warning("%s asked for %s but runs on %s", model_path, providers[0], self.provider)
        self._threads = (intra_op_threads, inter_op_threads)
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="ort")
        self._free: asyncio.Queue[ort.InferenceSession] | None = None

    def describe(self) -> str:
        intra, inter = self._threads
        return f"{len(self.sessions)} instance(s), {intra} intra-op / {inter} inter-op thread(s) each"

    @property
    def graph_inputs(self) -> list:
        return self.sessions[0].get_inputs()

    @property
    def graph_outputs(self) -> list:
        return self.sessions[0].get_outputs()

    @property
    def instances(self) -> int:
        return len(self.sessions)

    def _pool(self) -> asyncio.Queue:
        if self._free is None:  # created lazily, inside the running loop
            self._free = asyncio.Queue()
            for s in self.sessions:
                self._free.put_nowait(s)
        return self._free

    def run_each(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[list[np.ndarray]]:
        """Run the feeds on every instance, synchronously (load time: warm-up, golden checks),
        so no instance meets its first real request cold or unchecked."""
        return [session.run(outputs, feeds) for session in self.sessions]

    def run_sync(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """Run on the calling thread (a generation engine's own), on the first instance; ORT
        sessions take concurrent runs, so this needs no turn in the instance pool. Raises
        InvalidInput or InternalError."""
        try:
            return self.sessions[0].run(outputs, feeds)
        except Exception as e:
            raise _failure(e) from e

    def io_binding(self) -> ort.IOBinding:
        """A binding on the first instance, for run_binding (the engine's shared KV buffers)."""
        return self.sessions[0].io_binding()

    def run_binding(self, binding: ort.IOBinding) -> None:
        """run_sync with inputs and outputs bound in place (the binding holds the outputs).
        Raises InvalidInput or InternalError."""
        try:
            self.sessions[0].run_with_iobinding(binding)
        except Exception as e:
            raise _failure(e) from e

    async def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """Run on a free instance off the event loop. Raises InvalidInput or InternalError."""
        pool = self._pool()
        session = await pool.get()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, session.run, outputs, feeds)
        except Exception as e:
            raise _failure(e) from e
        finally:
            pool.put_nowait(session)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.sessions.clear()


def _failure(e: Exception) -> TServeError:
    """A run's exception as the error to answer with; an internal one is logged."""
    error = classify(e)
    if isinstance(error, InternalError):
        log.error("ONNX Runtime run failed", exc_info=e)
    return error
