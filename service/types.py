"""Domain objects shared by the layers: what a model accepts and what a request carries."""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.conventions.decoder import DecoderGraph

# Open Inference Protocol datatype <-> numpy. BYTES (strings: texts, encoded images) is not a
# graph's datatype here: a BYTES input goes to the model's task (service/tasks/), which tokenizes
# or decodes it; in numpy it is an object array of bytes.
BYTES = "BYTES"
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPE_OF_NUMPY = {v: k for k, v in DATATYPES.items()}
# ONNX Runtime's type strings, for specs auto-completed from the graph
DATATYPE_OF_ORT = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


class ModelState(enum.StrEnum):
    """A model version's state, as RepositoryIndex and `tserve_model_state` report it."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable
    optional: bool = False

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]

    @property
    def variable_axis(self) -> int | None:
        """The first variable dimension (counting the batch dimension as 0): the sequence axis."""
        for i, d in enumerate(self.dims):
            if d == -1:
                return i + 1
        return None


@dataclass(frozen=True)
class BatchingPolicy:
    enabled: bool
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 1024
    latency_target_s: float | None = None  # tserve.latency_target_ms: bounds waiting for a fuller batch
    max_batch_tokens: int | None = None  # rows x padded length of one batch (padded models; tserve.max_batch_tokens)


@dataclass(frozen=True)
class PaddingRules:
    """Inputs right-padded along their sequence axis with a value, and outputs cut back."""

    pad_values: dict[str, float] = field(default_factory=dict)
    unpad_outputs: tuple[str, ...] = ()  # glob patterns

    def unpads(self, output: str) -> bool:
        return any(fnmatch.fnmatchcase(output, pattern) for pattern in self.unpad_outputs)


@dataclass
class ModelSpec:
    name: str
    version: int
    platform: str
    model_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    batching: BatchingPolicy
    padding: PaddingRules
    vocab_size: int | None = None
    token_inputs: tuple[str, ...] = ()
    max_sequence_length: int | None = None
    position_table: int | None = None  # rows of the position table found in the graph (position ids < it)
    manifest: dict[str, Any] | None = None
    decoder: DecoderGraph | None = None  # set when the graph follows the decoder-with-past convention
    eos_token_ids: tuple[int, ...] = ()  # from an export's generation_config.json / config.json
    tokenizer_file: Path | None = None  # an export's tokenizer.json
    chat_template: Any = None  # service.generation.chat.ChatTemplate, from the export's tokenizer config
    seq2seq: Any = None  # service.conventions.seq2seq.Seq2SeqGraphs: an encoder-decoder export folder
    decoder_start_token_id: int | None = None  # encoder-decoders: the first target token
    max_new_tokens: int | None = None  # encoder-decoders: the longest target (generation_config max_length - 1)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    @property
    def tokenizer(self) -> dict | None:
        return (self.manifest or {}).get("tokenizer")


@dataclass
class InferRequest:
    """A decoded ModelInfer request: tensors are numpy arrays, shapes checked against bytes."""

    model_name: str
    model_version: str
    id: str
    inputs: dict[str, np.ndarray]
    requested_outputs: tuple[str, ...]
    parameters: dict[str, Any] = field(default_factory=dict)  # the task options (truncate, raw_scores, ...)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: dict[str, np.ndarray]
