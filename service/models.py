"""Model lifecycle: load every model version in the repository, verify, warm up, unload.

A model that fails (missing or corrupt file, bad config, checksum or golden-output mismatch)
is recorded UNAVAILABLE with the reason; the server and the other models keep serving.
Loading runs in a worker thread so health checks are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.batcher import DynamicBatcher
from service.errors import InvalidInput, ModelLoadError, ModelNotFound, Unavailable
from service.generated import model_config_pb2 as mc
from service.conventions.decoder import DecoderGraph
from service.conventions.seq2seq import ENCODER, MergedBranch, decoder_files, is_seq2seq
from service.generation.engine import EngineLimits, GenerationEngine
from service.generation.kv_slots import KVSlots
from service.generation.sampling import SamplingParams
from service.generation.sequence import Sequence
from service.generation.seq2seq_engine import Seq2SeqEngine
from service.generation.requests import GenerationConfig
from service.metrics import Metrics, ModelObserver
from service.repository import (
    build_spec,
    completed_config,
    model_names,
    read_config,
    read_manifest,
    runtime_options,
    select_versions,
    seq2seq_spec,
)
from service.runtime import OrtRuntime, choose_providers
from service.settings import Settings
from service.types import DATATYPES, ModelSpec, ModelState

log = logging.getLogger(__name__)



@dataclass
class ModelVersion:
    name: str
    version: int
    state: ModelState = ModelState.LOADING
    reason: str = ""
    spec: ModelSpec | None = None
    config: mc.ModelConfig | None = None  # as served by the ModelConfig RPC
    runtime: OrtRuntime | None = None
    batcher: DynamicBatcher | None = None
    observer: ModelObserver | None = None
    cost_seeds: list = field(default_factory=list)  # timed runs at load, for the batch policy
    # decoders (the decoder-with-past convention) also generate:
    engine: GenerationEngine | None = None
    generation: GenerationConfig | None = None
    # encoder-decoders: the decoder graphs beside `runtime` (the encoder), their files, and the
    # two decoders the engine drives (the merged graph's two branches when it is the only one)
    decoder_runtimes: tuple[OrtRuntime, ...] = ()
    graph_files: tuple[str, ...] = ()
    seq2seq_decoders: tuple = ()
    # a decoder whose manifest names a fused generation graph that matched model.onnx at load:
    # the engine's runtime and graph (ModelInfer keeps `runtime`)
    generation_runtime: OrtRuntime | None = None
    generation_graph: DecoderGraph | None = None

    @property
    def ready(self) -> bool:
        return self.state == ModelState.READY

    def graph_for(self, inputs: set[str]) -> OrtRuntime:
        """An encoder-decoder's graph whose inputs are exactly these (ModelInfer drives the
        three graphs one by one, for clients that run the decoding loop themselves)."""
        graphs = (self.runtime, *self.decoder_runtimes)
        for runtime in graphs:
            if {a.name for a in runtime.graph_inputs} == inputs:
                return runtime
        listed = "; ".join(f"{f}: {sorted(a.name for a in r.graph_inputs)[:4]}..."
                           for f, r in zip(self.graph_files, graphs))
        raise InvalidInput(f"model {self.name!r} is an encoder-decoder: a ModelInfer's inputs must be exactly "
                           f"those of one of its graphs ({listed})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_manifest_files(version_dir: Path, manifest: dict | None) -> None:
    """Every file a manifest lists (graphs, tokenizer.json, configs) is there, with its sha256:
    a model never serves with a tokenizer or config other than the one it shipped with."""
    for name, record in ((manifest or {}).get("files") or {}).items():
        path = version_dir / name
        if not path.is_file():
            raise ModelLoadError(f"{name} is missing (manifest.json lists it)")
        want = record.get("sha256") if isinstance(record, dict) else None
        if want and want != _sha256(path):
            raise ModelLoadError(f"{name} does not match the sha256 in manifest.json")


def _tensor(record: dict) -> np.ndarray:
    return np.array(record["data"], dtype=DATATYPES[record["datatype"]]).reshape(record["shape"])


def check_golden(spec: ModelSpec, runtime: OrtRuntime) -> None:
    """Re-run the manifest's golden inputs; a mismatch means a corrupt or wrong model."""
    for i, golden in enumerate((spec.manifest or {}).get("golden", [])):
        feeds = {name: _tensor(rec) for name, rec in golden["inputs"].items()}
        names = list(golden["outputs"])
        for instance_outputs in runtime.run_each(feeds, names):
            _compare_golden(i, golden, names, instance_outputs)


def _compare_golden(i: int, golden: dict, names: list[str], outputs: list[np.ndarray]) -> None:
    for name, got in zip(names, outputs):
        want = _tensor(golden["outputs"][name])
        if got.shape != want.shape:
            raise ModelLoadError(f"golden sample {i}: output {name!r} has shape {list(got.shape)}, expected {list(want.shape)}")
        diff = float(np.abs(got - want).max()) if got.size else 0.0
        if not diff <= golden.get("atol", 1e-4):
            raise ModelLoadError(f"golden sample {i}: output {name!r} differs by {diff:.3g} (atol {golden.get('atol', 1e-4)})")


FUSED_ATOL = 1e-3  # largest |logit difference| a fused generation graph may show against model.onnx
FUSED_CHECK_STEPS = 3  # decode steps checked after the prompt


def fused_mismatch(spec: ModelSpec, plain: OrtRuntime, fused: OrtRuntime, graph: DecoderGraph) -> str | None:
    """Why a fused generation graph may not stand in for the model's graph, or None. It must
    take the same inputs and, driven as the engine drives it (one slot of a shared buffer),
    give model.onnx's logits within FUSED_ATOL on the golden prompt (a fixed one where the
    manifest has none) and on FUSED_CHECK_STEPS decode steps after it, both fed the same tokens."""
    if {a.name for a in fused.graph_inputs} != {a.name for a in plain.graph_inputs}:
        return "takes other inputs than model.onnx"
    if not graph.max_length:
        return "needs the model's context length for its KV buffer, and none is known"
    golden = (spec.manifest or {}).get("golden", [])
    prompt = (_tensor(golden[0]["inputs"]["input_ids"])[0] if golden
              else np.arange(1, 9, dtype=np.int64) % (spec.vocab_size or 2)).tolist()
    decoder, T = spec.decoder, len(prompt)
    out = plain.run_sync(decoder.prompt_feeds(np.array([prompt], np.int64)), decoder.outputs)
    want, tokens = [out[0][0, -1]], []
    for i in range(FUSED_CHECK_STEPS):
        tokens.append(int(want[-1].argmax()))
        out = plain.run_sync(decoder.feeds(np.array([[tokens[-1]]], np.int64), np.ones((1, T + i + 1), np.int64),
                                           np.array([[T + i]], np.int64), out[1:]), decoder.outputs)
        want.append(out[0][0, -1])
    slots = KVSlots(graph, fused, slots=1)
    seq = Sequence("fused-graph-check", prompt, SamplingParams(), FUSED_CHECK_STEPS + 1)
    got = [slots.prefill(seq, T)[0, -1].copy()]
    seq.prefilled = T
    slots.join(seq, tokens[0])
    for i in range(FUSED_CHECK_STEPS):
        slots.next_ids[0] = tokens[i]
        got.append(slots.decode()[0].copy())
    diff = max(float(np.abs(g - w).max()) if g.shape == w.shape else float("inf") for g, w in zip(got, want))
    return None if diff <= FUSED_ATOL else (f"differs from model.onnx by {diff:.3g} on the golden prompt and "
                                            f"{FUSED_CHECK_STEPS} decode steps (at most {FUSED_ATOL} allowed)")


def warm_up_feeds(spec: ModelSpec, batch: int = 1, length: int = 1) -> dict[str, np.ndarray]:
    """A synthetic input: decoders get prompts of `length` tokens with an empty cache, other
    graphs zeros of `length` on every variable axis."""
    if spec.decoder is not None:
        return spec.decoder.prompt_feeds(np.zeros((batch, length), np.int64))
    feeds = {}
    for t in spec.inputs:
        shape = ([batch] if spec.max_batch_size else []) + [length if d == -1 else d for d in t.dims]
        feeds[t.name] = np.ones(shape, t.dtype) if t.name == "attention_mask" else np.zeros(shape, t.dtype)
    return feeds


def warm_up(spec: ModelSpec, runtime: OrtRuntime) -> None:
    """Run every instance once so no first request pays for allocation and kernel setup."""
    runtime.run_each(warm_up_feeds(spec), [t.name for t in spec.outputs])


def seq2seq_greedy(spec: ModelSpec, encoder: OrtRuntime, decoder: OrtRuntime, with_past: OrtRuntime,
                   source: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens for one source through the three graphs (without the end-of-sequence
    token): the warm-up, and the check against the manifest's golden answers."""
    g, n = spec.seq2seq, 2 * spec.seq2seq.n_layer
    ids = np.array([source], np.int64)
    mask = np.ones_like(ids)
    hidden = encoder.run_sync({"input_ids": ids, "attention_mask": mask}, ["last_hidden_state"])[0]
    out = decoder.run_sync({"input_ids": np.full((1, 1), spec.decoder_start_token_id, np.int64),
                            "encoder_hidden_states": hidden, "encoder_attention_mask": mask},
                           ["logits", *g.self_names, *g.cross_names])
    self_kv, cross_kv, tokens = out[1:1 + n], out[1 + n:], []
    for step in range(max_new_tokens):
        token = int(out[0][0, -1].argmax())
        if token in spec.eos_token_ids:
            break
        tokens.append(token)
        out = with_past.run_sync(g.with_past_feeds(np.array([[token]], np.int64), mask,
                                                   np.ones((1, step + 2), np.int64), self_kv, cross_kv),
                                 ["logits", *g.self_names])
        self_kv = out[1:]
    return tokens


def check_seq2seq_golden(spec: ModelSpec, *runtimes: OrtRuntime) -> None:
    for i, golden in enumerate((spec.manifest or {}).get("golden", [])):
        got = seq2seq_greedy(spec, *runtimes, golden["source_ids"], golden["max_new_tokens"])
        if got != golden["greedy"]:
            raise ModelLoadError(f"golden sample {i}: greedy tokens {got[:8]}... differ from the manifest's "
                                 f"{golden['greedy'][:8]}...")


COST_LENGTH = 16  # tokens per row in the timed runs that seed the batch policy's cost line


def time_batches(spec: ModelSpec, runtime: OrtRuntime, repeats: int = 3) -> list[tuple[float, float]]:
    """(rows x length, seconds) of whole runs at batch 1 and at the largest batch: the first
    two points of the cost line the batcher decides with (it keeps learning from real batches)."""
    if not spec.batching.enabled or spec.max_batch_size < 2:
        return []
    outputs = [t.name for t in spec.outputs]
    seeds = []
    for rows in (1, spec.max_batch_size):
        feeds = warm_up_feeds(spec, rows, COST_LENGTH)
        runtime.run_each(feeds, outputs)  # this shape's first run allocates; not timed
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            runtime.sessions[0].run(outputs, feeds)
            best = min(best, time.perf_counter() - started)
        seeds.append((float(rows * COST_LENGTH), best))
    return seeds


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repo = settings.model_repository
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.on_change: list = []  # async callbacks(ModelVersion), awaited after a version's state changed

    async def load_all(self) -> None:
        await asyncio.gather(*(self.load(name) for name in model_names(self.repo)))

    def _runtime(self, path: Path, providers: list[str], entry, instances: int | None = None) -> OrtRuntime:
        opts = runtime_options(entry.config)  # the model's own config first, then the server's settings
        return OrtRuntime(
            path,
            providers,
            instances=instances or self.settings.instance_count or opts.instances,
            intra_op_threads=opts.intra_op_threads or self.settings.session_threads,
            inter_op_threads=opts.inter_op_threads or self.settings.inter_op_threads,
            spin=self.settings.ort_spinning,
        )

    def _load_seq2seq_sync(self, mv: ModelVersion, entry, providers: list[str]) -> None:
        """An encoder-decoder export folder (Optimum's seq2seq layout): the encoder and two
        decoders, or the encoder and the merged decoder; generation only."""
        manifest = read_manifest(entry.path)
        files = (ENCODER, *decoder_files(entry.path))
        check_manifest_files(entry.path, manifest)
        runtimes = [self._runtime(entry.path / f, providers, entry) for f in files]
        try:
            if len(runtimes) == 2:
                decoders = (MergedBranch(runtimes[1], use_cache=False), MergedBranch(runtimes[1], use_cache=True))
            else:
                decoders = (runtimes[1], runtimes[2])
            mv.spec = seq2seq_spec(entry, decoders[0].graph_outputs, decoders[1].graph_inputs, manifest)
            seq2seq_greedy(mv.spec, runtimes[0], *decoders, [0, 0], 2)  # warm-up: every graph once
            if self.settings.verify_golden:
                check_seq2seq_golden(mv.spec, runtimes[0], *decoders)
            mv.generation = GenerationConfig.from_spec(mv.spec)
        except ValueError as e:
            for r in runtimes:
                r.close()
            raise ModelLoadError(str(e)) from e
        except Exception:
            for r in runtimes:
                r.close()
            raise
        mv.runtime, mv.decoder_runtimes, mv.seq2seq_decoders = runtimes[0], tuple(runtimes[1:]), decoders
        mv.graph_files = files
        mv.config = completed_config(mv.spec, entry.config)

    def _load_version_sync(self, mv: ModelVersion, entry) -> None:
        spec = None
        providers = choose_providers(self.settings.execution_provider, self.settings.provider_fallback)
        if is_seq2seq(entry.path):
            return self._load_seq2seq_sync(mv, entry, providers)
        model_file = entry.path / (entry.config.default_model_filename or "model.onnx")
        manifest = read_manifest(entry.path)
        if model_file.exists():  # a missing graph is reported as such by the runtime
            check_manifest_files(entry.path, manifest)
        runtime = self._runtime(model_file, providers, entry)
        try:
            spec = build_spec(entry, runtime.graph_inputs, runtime.graph_outputs, manifest,
                              self.settings.default_max_queue_size)
            if self.settings.verify_golden:
                check_golden(spec, runtime)
            warm_up(spec, runtime)
            mv.cost_seeds = time_batches(spec, runtime)
            if spec.decoder is not None:
                mv.generation = GenerationConfig.from_spec(spec)  # reads the tokenizer, if any
                self._fused_generation(mv, entry, spec, runtime, providers)
                self._check_kv_reservation(spec.decoder)  # a genai folder's graph shares its buffer
        except Exception:
            runtime.close()
            raise
        mv.spec, mv.runtime, mv.config = spec, runtime, completed_config(spec, entry.config)

    def _fused_generation(self, mv: ModelVersion, entry, spec: ModelSpec, runtime: OrtRuntime,
                          providers: list[str]) -> None:
        """A decoder's manifest may name a fused generation graph (generation.graph, written by
        export/gqa_graph.py: GroupQueryAttention over a shared KV buffer). The engine runs it
        only if, driven as the engine drives it, it gives model.onnx's logits on the golden
        prompt and the decode steps after it; otherwise, or if it does not load, the engine runs
        model.onnx and the log says why. A model never changes its outputs for speed."""
        name = (spec.manifest or {}).get("generation", {}).get("graph")
        if not name:  # an onnxruntime-genai folder's one graph is itself fused
            mv.observer.generation_graph("fused" if spec.decoder.shared_kv else "plain")
            return
        kind = "plain"
        try:
            fused = self._runtime(entry.path / name, providers, entry, instances=1)  # the engine runs one session
        except Exception as e:
            log.warning("model %s version %d: the fused generation graph %s does not load (%s); generating with "
                        "model.onnx", entry.name, entry.version, name, str(e)[:200])
        else:
            graph = dataclasses.replace(spec.decoder, shared_kv=True, max_length=spec.max_sequence_length or 0)
            try:
                problem = fused_mismatch(spec, runtime, fused, graph)
                if problem is None:
                    self._check_kv_reservation(graph)
            except ModelLoadError as e:
                problem = str(e)
            except Exception as e:
                problem = f"could not be checked ({type(e).__name__}: {str(e)[:200]})"
            if problem is None:
                mv.generation_runtime, mv.generation_graph, kind = fused, graph, "fused"
                log.info("model %s version %d generates with %s (shared KV buffer)", entry.name, entry.version, name)
            else:
                fused.close()
                log.warning("model %s version %d: %s %s; generating with model.onnx", entry.name, entry.version, name, problem)
        mv.observer.generation_graph(kind)

    def _check_kv_reservation(self, graph: DecoderGraph) -> None:
        """A shared KV buffer may grow to slots x context: refuse one that would exceed the setting."""
        if not graph.shared_kv:
            return
        needed = KVSlots.reserved_bytes(graph, self.settings.generation_max_sequences)
        limit = self.settings.generation_kv_buffer_max_bytes
        if needed > limit:
            raise ModelLoadError(
                f"its shared KV buffer needs {needed / 2**20:,.0f} MiB ({self.settings.generation_max_sequences} "
                f"sequences x {graph.max_length} tokens), above generation_kv_buffer_max_bytes ({limit / 2**20:,.0f} MiB): "
                "lower --generation-max-sequences or the context (tserve.max_sequence_length)")

    async def load(self, name: str) -> None:
        """(Re)load a model's versions. Raises ModelNotFound if the repository has no such model."""
        if name not in model_names(self.repo):
            raise ModelNotFound(f"model {name!r} is not in the repository")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            await self._unload_locked(name)
            try:
                entries = select_versions(self.repo / name, read_config(self.repo / name))
            except ModelLoadError as e:
                mv = ModelVersion(name, 0, ModelState.UNAVAILABLE, str(e))
                self._models[name] = {0: mv}
                log.error("model %s failed to load: %s", name, e)
                await self._changed(mv)
                return
            self._models[name] = {e.version: ModelVersion(name, e.version) for e in entries}
            for entry in entries:
                mv = self._models[name][entry.version]
                mv.observer = ModelObserver(self.metrics, name, entry.version)
                await self._changed(mv)
                started = time.perf_counter()
                try:
                    await asyncio.to_thread(self._load_version_sync, mv, entry)
                except ModelLoadError as e:
                    mv.state, mv.reason = ModelState.UNAVAILABLE, str(e)
                except Exception as e:  # anything ORT or numpy raised on a broken model
                    mv.state, mv.reason = ModelState.UNAVAILABLE, f"{type(e).__name__}: {str(e)[:300]}"
                else:
                    try:
                        self._start_schedulers(mv)
                    except Exception as e:  # e.g. no memory for a KV buffer
                        mv.state, mv.reason = ModelState.UNAVAILABLE, f"{type(e).__name__}: {str(e)[:300]}"
                        await self._stop(mv)
                    else:
                        mv.state = ModelState.READY
                        seconds = time.perf_counter() - started
                        mv.observer.loaded(seconds, mv.runtime.provider)
                        log.info("model %s version %d ready on %s in %.2fs (%s)", name, entry.version,
                                 mv.runtime.provider, seconds, mv.runtime.describe())
                if mv.state == ModelState.UNAVAILABLE:
                    log.error("model %s version %d failed to load: %s", name, entry.version, mv.reason)
                await self._changed(mv)

    def _start_schedulers(self, mv: ModelVersion) -> None:
        """The batcher for inference; for decoders, the generation engine too; encoder-decoders
        generate only."""
        s = self.settings
        limits = EngineLimits(max_sequences=s.generation_max_sequences, max_queue=s.generation_max_queue,
                              token_budget=s.generation_token_budget, scheduling=s.generation_scheduling,
                              speculative_tokens=s.generation_speculative_tokens,
                              prompt_lookup_max=s.generation_prompt_lookup_max,
                              stream_interval=s.generation_stream_interval)
        if mv.spec.seq2seq is not None:
            spec = mv.spec
            mv.engine = Seq2SeqEngine(mv.name, mv.runtime, *mv.seq2seq_decoders, spec.seq2seq,
                                      spec.decoder_start_token_id, spec.padding.pad_values.get("input_ids", 0),
                                      limits, mv.observer.generation_step)
            mv.engine.start()
            return
        mv.batcher = DynamicBatcher(mv.spec, mv.runtime, mv.observer, mv.cost_seeds)
        mv.batcher.start()
        if mv.spec.decoder is not None:
            mv.engine = GenerationEngine(mv.name, mv.generation_runtime or mv.runtime, mv.generation_graph or mv.spec.decoder,
                                         limits, mv.observer.generation_step)
            mv.engine.start()

    async def _changed(self, mv: ModelVersion) -> None:
        if mv.observer:
            mv.observer.state(mv.state)
        for callback in self.on_change:
            await callback(mv)

    async def unload(self, name: str) -> None:
        if name not in self._models:
            raise ModelNotFound(f"model {name!r} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            await self._unload_locked(name)

    async def _unload_locked(self, name: str) -> None:
        for mv in self._models.get(name, {}).values():
            if mv.state != ModelState.READY:
                continue
            mv.state, mv.reason = ModelState.UNLOADED, "unloaded"
            await self._stop(mv)
            await self._changed(mv)

    @staticmethod
    async def _stop(mv: ModelVersion) -> None:
        """Stop a version's schedulers and close its sessions."""
        if mv.engine:
            await mv.engine.close()
        if mv.batcher:
            await mv.batcher.close()
        for runtime in (mv.runtime, *mv.decoder_runtimes, mv.generation_runtime):
            if runtime:
                await asyncio.to_thread(runtime.close)

    async def close(self) -> None:
        for name in list(self._models):
            await self._unload_locked(name)

    # -- lookups ----------------------------------------------------------------------------

    def versions(self, name: str) -> dict[int, ModelVersion]:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model {name[:64]!r}")
        return versions

    def get(self, name: str, version: str = "", ready: bool = True) -> ModelVersion:
        """The named version, or the latest; raises NotFound / Unavailable (when ready=True)."""
        versions = self.versions(name)
        if version:
            if not version.isdigit() or int(version) not in versions:
                raise ModelNotFound(f"model {name!r} has no version {version[:16]!r} (loaded: {sorted(versions)})")
            mv = versions[int(version)]
        else:
            ready_versions = [v for v in versions.values() if v.state == ModelState.READY]
            mv = max(ready_versions, key=lambda v: v.version) if ready_versions else max(versions.values(), key=lambda v: v.version)
        if ready and mv.state != ModelState.READY:
            raise Unavailable(f"model {name!r} version {mv.version} is not ready: {mv.state}{': ' + mv.reason if mv.reason else ''}")
        return mv

    def all(self) -> list[ModelVersion]:
        return [mv for versions in self._models.values() for mv in versions.values()]

    def index(self) -> list[ModelVersion]:
        """Every model in the repository: loaded versions, and those never loaded."""
        listed = {mv.name for mv in self.all()}
        unloaded = [ModelVersion(n, 0, ModelState.UNLOADED) for n in model_names(self.repo) if n not in listed]
        return sorted(self.all() + unloaded, key=lambda mv: (mv.name, mv.version))

    @property
    def all_ready(self) -> bool:
        return all(mv.state == ModelState.READY for mv in self.all())
