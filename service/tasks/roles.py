"""What an encoder or vision model is for, read from its folder with no configuration, and how
each role turns a request's inputs into graph rows and the graph's outputs into answers.

    role            graph                                          folder
    embed           input_ids, attention_mask[, token_type_ids]   tokenizer.json (+ a
                    -> last_hidden_state [B, T, H]                 sentence-transformers pooling)
    classify        ... -> logits [B, L], L > 1                    tokenizer.json, id2label
    rerank          ... -> logits [B, 1] over (query, text) pairs  tokenizer.json (TEI's rule)
    token_classify  ... -> logits [B, T, L]                        tokenizer.json, id2label
    image_classify  pixel_values [B, C, H, W] -> logits [B, L]     preprocessor_config.json

Every input of a request is its own row for the batcher (service/dataplane.py `run_task`), so
the inputs of many requests share batches and a request is never held to a row cap it did not
choose. Scores are those TEI answers: softmax over the labels, the sigmoid for one label (and
for a multi-label problem_type), the logits themselves with raw_scores.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.conventions import encoder
from service.conventions.sentence_transformers import Pooling, read_pooling
from service.errors import InvalidInput, ModelLoadError
from service.tasks.text import DEFAULT_MAX_LENGTH, Encoded, TextInputs
from service.tasks.vision import PIXEL_VALUES, ImageProcessor, read_processor
from service.types import ModelSpec

LOGITS = encoder.LOGITS


class Role(enum.StrEnum):
    EMBED = "embed"
    CLASSIFY = "classify"
    RERANK = "rerank"
    TOKEN_CLASSIFY = "token_classify"
    IMAGE_CLASSIFY = "image_classify"


TEXT_ROLES = (Role.EMBED, Role.CLASSIFY, Role.RERANK, Role.TOKEN_CLASSIFY)
WHAT = {  # how a refusal names a role
    Role.EMBED: "a text embedder (an encoder with last_hidden_state and a tokenizer.json)",
    Role.CLASSIFY: "a text classifier (logits over labels and a tokenizer.json)",
    Role.RERANK: "a reranker (a one-label text classifier over pairs)",
    Role.TOKEN_CLASSIFY: "a token classifier (logits per token and a tokenizer.json)",
    Role.IMAGE_CLASSIFY: "an image classifier (pixel_values -> logits)",
}


@dataclass
class TaskRequest:
    model: str
    inputs: list  # texts, (text, text) pairs, token id lists, or image bytes
    request_id: str = ""
    model_version: str = ""
    truncate: bool = False  # cut a text past the model's limit instead of refusing it
    normalize: bool = True  # embeddings: unit length (TEI's default)
    dimensions: int | None = None  # embeddings: the first d components (Matryoshka), normalised again
    raw_scores: bool = False  # classifiers: the logits, not softmax / sigmoid


@dataclass
class Row:
    feeds: dict[str, np.ndarray]
    tokens: int = 0
    encoded: Encoded | None = None


@dataclass
class TaskResult:
    values: list[Any]  # one answer per input, as the role makes it
    tokens: int  # every input's tokens, as the model saw them


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class TaskModel:
    role: Role
    output: str  # the graph output every answer is made from
    text: TextInputs | None = None
    pooling: Pooling | None = None  # embed
    hidden_size: int | None = None  # embed
    labels: tuple[str, ...] = ()  # the classifiers, by logit index
    multi_label: bool = False
    images: ImageProcessor | None = None  # image_classify

    # -- inputs -> rows ---------------------------------------------------------------------

    def rows(self, request: TaskRequest) -> list[Row]:
        """One graph row per input; InvalidInput naming the input that cannot be one."""
        if self.role == Role.IMAGE_CLASSIFY:
            if not request.inputs:
                raise InvalidInput("inputs: at least one image")
            return [
                Row({PIXEL_VALUES: self.images(data, f"inputs[{i}]")[None]}) for i, data in enumerate(request.inputs)
            ]
        if self.role == Role.EMBED and request.dimensions is not None and self.hidden_size is not None:
            if not 1 <= request.dimensions <= self.hidden_size:
                raise InvalidInput(f"dimensions must be between 1 and {self.hidden_size} (got {request.dimensions})")
        encoded = self.text.encode(request.inputs, request.truncate, request.model)
        return [Row(self.text.feeds(e), len(e.ids), e) for e in encoded]

    # -- one row's output -> its answer -----------------------------------------------------

    def answer(self, row: Row, out: np.ndarray, request: TaskRequest) -> Any:
        if self.role == Role.EMBED:
            return self._embedding(out[0].astype(np.float32), request)
        if self.role == Role.TOKEN_CLASSIFY:
            return self._entities(row, out[0].astype(np.float32), request)
        logits = out[0].astype(np.float32)
        if request.raw_scores:
            return logits
        return sigmoid(logits) if len(logits) == 1 or self.multi_label else softmax(logits)

    def ranked(self, scores: np.ndarray) -> list[dict]:
        """A classifier's scores as TEI's /predict answers them: every label, best first."""
        order = np.argsort(-scores, kind="stable")
        return [{"label": self.labels[i], "score": float(scores[i])} for i in order]

    def _embedding(self, states: np.ndarray, request: TaskRequest) -> np.ndarray:
        """One text's token states [T, H] (its own tokens only: the batcher cut the padding)."""
        mode = self.pooling.mode
        if mode == "cls":
            vector = states[0].copy()
        elif mode == "last_token":
            vector = states[-1].copy()
        elif mode == "max":
            vector = states.max(0)
        else:
            vector = states.mean(0)
        if request.dimensions is not None:
            vector = vector[: request.dimensions]
        if request.normalize or request.dimensions is not None or self.pooling.normalize:
            norm = float(np.linalg.norm(vector))
            vector = vector / norm if norm > 0 else vector
        return vector

    def _entities(self, row: Row, logits: np.ndarray, request: TaskRequest) -> list[dict]:
        """Every token's best label but the outside label "O" and special tokens, as the
        transformers token-classification pipeline answers with no aggregation."""
        scores = logits if request.raw_scores else softmax(logits)
        enc = row.encoded.encoding
        special = enc.special_tokens_mask if enc is not None else [0] * len(row.encoded.ids)
        out = []
        for i, best in enumerate(scores.argmax(-1).tolist()):
            label = self.labels[best]
            if special[i] or label == "O":
                continue
            entity = {"entity": label, "score": float(scores[i, best]), "index": i}
            if enc is not None:
                entity.update(word=enc.tokens[i], start=enc.offsets[i][0], end=enc.offsets[i][1])
            out.append(entity)
        return out


# -- the role from the folder ---------------------------------------------------------------


def _config(version_dir: Path) -> dict:
    path = version_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"config.json is unreadable: {e}") from None
    return data if isinstance(data, dict) else {}


def _labels(config: dict, count: int) -> tuple[str, ...]:
    id2label = config.get("id2label") if isinstance(config.get("id2label"), dict) else {}
    return tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count))


def task_of(spec: ModelSpec, version_dir: Path) -> TaskModel | None:
    """The model's role, or None for a graph served as tensors only."""
    names = {t.name for t in spec.inputs}
    config = _config(version_dir)
    logits = spec.output(LOGITS)
    if names == {PIXEL_VALUES} and logits is not None and len(logits.dims) == 1:
        try:
            processor = read_processor(version_dir, config)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        return TaskModel(Role.IMAGE_CLASSIFY, LOGITS, labels=_labels(config, logits.dims[0]), images=processor)
    if spec.tokenizer_file is None or not {encoder.INPUT_IDS, encoder.ATTENTION_MASK} <= names <= set(encoder.PADDED):
        return None
    from tokenizers import Tokenizer

    try:
        pooling = read_pooling(version_dir)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    limits = [n for n in (pooling.max_seq_length, spec.max_sequence_length) if n]
    text = TextInputs(
        Tokenizer.from_file(str(spec.tokenizer_file)),
        min(limits) if limits else DEFAULT_MAX_LENGTH,
        tuple(sorted(names)),
        spec.vocab_size,
    )
    hidden = spec.output(encoder.LAST_HIDDEN_STATE)
    if hidden is not None:
        width = hidden.dims[-1] if hidden.dims and hidden.dims[-1] > 0 else None
        return TaskModel(Role.EMBED, encoder.LAST_HIDDEN_STATE, text, pooling=pooling, hidden_size=width)
    if logits is None or not logits.dims or logits.dims[-1] <= 0:
        return None
    count = logits.dims[-1]
    multi = config.get("problem_type") == "multi_label_classification"
    if len(logits.dims) == 1:
        role = Role.RERANK if count == 1 else Role.CLASSIFY
        return TaskModel(role, LOGITS, text, labels=_labels(config, count), multi_label=multi)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if len(logits.dims) == 2 and logits.dims[0] == -1 and encoder.classification_head(architectures) == "token":
        return TaskModel(Role.TOKEN_CLASSIFY, LOGITS, text, labels=_labels(config, count), multi_label=multi)
    return None
