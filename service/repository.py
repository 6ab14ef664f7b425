"""The model repository in Triton's layout: <repo>/<model>/config.pbtxt and <version>/model.onnx.

Reads config.pbtxt with protobuf's text format into Triton's ModelConfig message, picks the
versions its version_policy asks for, reads the export manifest where one exists, and turns
it all, together with the ONNX graph's own inputs and outputs (auto-completion, as Triton
does), into a ModelSpec.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from service.conventions import encoder
from service.conventions.decoder import INPUT_IDS, DecoderGraph
from service.conventions.sentence_transformers import SNAPSHOT_GRAPH
from service.conventions.seq2seq import ENCODER, Seq2SeqGraphs
from service.errors import ModelLoadError
from service.tasks.vision import PIXEL_VALUES
from service.generation.chat import ChatTemplate, load_chat_template
from service.generated import model_config_pb2 as mc
from service.types import DATATYPE_OF_ORT, DATATYPES, BatchingPolicy, ModelSpec, PaddingRules, TensorSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8  # for a graph with a dynamic batch axis and no config saying otherwise
ENCODER_MAX_BATCH_SIZE = 32  # the same for a BERT-style encoder, whose batches the token budget bounds
DEFAULT_MAX_BATCH_TOKENS = 16384  # rows x padded length of one batch of a padded model (TEI's default)


@dataclass
class VersionEntry:
    name: str
    version: int
    path: Path  # the version folder
    config: mc.ModelConfig


def model_names(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_config(model_dir: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    path = model_dir / "config.pbtxt"
    if path.exists():
        try:
            # skip fields of Triton's full schema that tserve does not use
            text_format.Parse(path.read_text(), config, allow_unknown_field=True)
        except text_format.ParseError as e:
            raise ModelLoadError(f"config.pbtxt does not parse: {e}") from e
    if config.name and config.name != model_dir.name:
        raise ModelLoadError(f"config.pbtxt names the model {config.name!r} but its folder is {model_dir.name!r}")
    config.name = model_dir.name
    if config.platform and config.platform != "onnxruntime_onnx" or config.backend not in ("", "onnxruntime"):
        raise ModelLoadError(f"platform {config.platform or config.backend!r} is not served; tserve runs ONNX models")
    config.platform = "onnxruntime_onnx"
    return config


def select_versions(model_dir: Path, config: mc.ModelConfig) -> list[VersionEntry]:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ModelLoadError("no numbered version folder")
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        chosen = versions
    elif policy == "specific":
        chosen = [v for v in versions if v in set(config.version_policy.specific.versions)]
        missing = set(config.version_policy.specific.versions) - set(versions)
        if missing:
            raise ModelLoadError(f"version_policy asks for versions {sorted(missing)} which do not exist")
    else:
        n = config.version_policy.latest.num_versions or 1
        chosen = versions[-n:]
    return [VersionEntry(model_dir.name, v, model_dir / str(v), config) for v in chosen]


def graph_file(entry: VersionEntry) -> Path:
    """The version's graph: config.pbtxt's default_model_filename, else model.onnx, else a
    sentence-transformers snapshot's onnx/model.onnx."""
    if entry.config.default_model_filename:
        return entry.path / entry.config.default_model_filename
    plain = entry.path / "model.onnx"
    if not plain.exists() and (entry.path / SNAPSHOT_GRAPH).is_file():
        return entry.path / SNAPSHOT_GRAPH
    return plain


def read_manifest(version_dir: Path) -> dict | None:
    path = version_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"manifest.json is unreadable: {e}") from e


@dataclass(frozen=True)
class ExportMetadata:
    """What a Hugging Face / Optimum export folder says beside its graph (config.json,
    generation_config.json, tokenizer.json): used where config.pbtxt, the tserve.* parameters
    and a tserve manifest say nothing."""

    vocab_size: int | None = None
    max_positions: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    tokenizer_file: Path | None = None
    chat_template: ChatTemplate | None = None
    decoder_start_token_id: int | None = None  # encoder-decoders
    max_length: int | None = None  # generation_config.json's max_length
    # an onnxruntime-genai folder (genai_config.json): generation keeps a shared KV buffer
    shared_kv: bool = False
    head_size: int | None = None
    image_shape: tuple[int, int, int] | None = None  # a vision model's [C, H, W] (num_channels, image_size)
    head: str | None = None  # "sequence" / "token": config.json's architectures name a classification head


def _ids(value) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int))
    return ()


def read_export_metadata(version_dir: Path) -> ExportMetadata:
    def load(name: str) -> dict:
        path = version_dir / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{name} is unreadable: {e}") from e
        return data if isinstance(data, dict) else {}

    config, generation = load("config.json"), load("generation_config.json")
    genai = load("genai_config.json")  # onnxruntime-genai's model builder writes this instead
    genai_model = genai.get("model") if isinstance(genai.get("model"), dict) else {}
    genai_decoder = genai_model.get("decoder") if isinstance(genai_model.get("decoder"), dict) else {}
    if genai_model:
        config = {
            "vocab_size": genai_model.get("vocab_size"),
            "max_position_embeddings": genai_model.get("context_length"),
            "eos_token_id": genai_model.get("eos_token_id"),
            "pad_token_id": genai_model.get("pad_token_id"),
            **config,
        }
    vocab = config.get("vocab_size")
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    eos = _ids(generation.get("eos_token_id", config.get("eos_token_id")))
    if isinstance(vocab, int) and any(not 0 <= e < vocab for e in eos):
        log.warning("%s: eos_token_id %s lies outside the vocabulary [0, %d); ignored", version_dir, list(eos), vocab)
        eos = tuple(e for e in eos if 0 <= e < vocab)
    tokenizer = version_dir / "tokenizer.json"
    return ExportMetadata(
        vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else None,
        eos_token_ids=eos,
        pad_token_id=config["pad_token_id"] if isinstance(config.get("pad_token_id"), int) else None,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
        chat_template=load_chat_template(version_dir),
        decoder_start_token_id=next(
            (
                v
                for v in (generation.get("decoder_start_token_id"), config.get("decoder_start_token_id"))
                if isinstance(v, int)
            ),
            None,
        ),
        max_length=generation.get("max_length") if isinstance(generation.get("max_length"), int) else None,
        # genai's graphs read each row's length from its mask (GroupQueryAttention): rows must
        # start at column 0, as KVSlots keeps them, whether or not genai itself shares the buffer
        shared_kv=bool(genai_model),
        head_size=genai_decoder.get("head_size") if isinstance(genai_decoder.get("head_size"), int) else None,
        image_shape=_image_shape(config),
        head=encoder.classification_head(a for a in config.get("architectures") or [] if isinstance(a, str)),
        max_positions=_usable_positions(config, positions, version_dir),
    )


OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "longformer"}  # pad_token_id + 1 positions unused


def _usable_positions(config: dict, positions, version_dir: Path) -> int | None:
    """The longest input the position table takes: RoBERTa-family tables start after the pad id
    (514 entries, 512 usable, as TEI counts them), and a tokenizer's model_max_length may be lower."""
    if not (isinstance(positions, int) and positions > 0):
        return None
    pad = config.get("pad_token_id")
    if config.get("model_type") in OFFSET_POSITIONS and isinstance(pad, int) and 0 <= pad < positions:
        positions -= pad + 1
    try:
        limit = json.loads((version_dir / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        limit = None
    if isinstance(limit, int) and 0 < limit < positions:
        positions = limit
    return positions


def _image_shape(config: dict) -> tuple[int, int, int] | None:
    size, channels = config.get("image_size"), config.get("num_channels", 3)
    if isinstance(size, int):
        size = [size, size]
    if not (isinstance(channels, int) and isinstance(size, list) and len(size) == 2):
        return None
    if not all(isinstance(d, int) and d > 0 for d in (channels, *size)):
        return None
    return (channels, size[0], size[1])


def _parse_map(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = float(value)
    return out


def _positive(params: dict[str, str], key: str, kind: type[int] | type[float]) -> int | float | None:
    """A parameter that must be a positive int or float, or None when it is not set."""
    if not params.get(key):
        return None
    try:
        value = kind(params[key])
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ModelLoadError(f"parameter {key} must be {noun}, not {params[key][:32]!r}") from None
    if not value > 0:
        raise ModelLoadError(
            f"parameter {key} must be at least 1" if kind is int else f"parameter {key} must be above 0"
        )
    return value


@dataclass(frozen=True)
class RuntimeOptions:
    """What a model's config asks of its sessions; None leaves the server's setting."""

    instances: int
    intra_op_threads: int | None
    inter_op_threads: int | None


def runtime_options(config: mc.ModelConfig) -> RuntimeOptions:
    params = {k: v.string_value for k, v in config.parameters.items()}
    return RuntimeOptions(
        instances=sum(g.count or 1 for g in config.instance_group) or 1,
        # Triton's onnxruntime backend reads its thread settings from these parameters
        intra_op_threads=_positive(params, "intra_op_thread_count", int),
        inter_op_threads=_positive(params, "inter_op_thread_count", int),
    )


def build_spec(
    entry: VersionEntry, graph_inputs: list, graph_outputs: list, manifest: dict | None, default_max_queue_size: int
) -> ModelSpec:
    """ModelSpec from the config and manifest, completed and checked against the session's graph
    metadata (graph_inputs/outputs are onnxruntime NodeArg lists: name, type, shape)."""
    config = entry.config
    graph_in = {a.name: a for a in graph_inputs}
    graph_out = {a.name: a for a in graph_outputs}

    batch_dynamic = all(a.shape and not isinstance(a.shape[0], int) for a in [*graph_inputs, *graph_outputs])
    has_config_tensors = bool(config.input) or bool(config.output)
    max_batch = config.max_batch_size
    if not has_config_tensors and max_batch == 0 and batch_dynamic:
        max_batch = DEFAULT_MAX_BATCH_SIZE

    def from_graph(arg, optional: bool = False) -> TensorSpec:
        if arg.type not in DATATYPE_OF_ORT:
            raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which tserve does not serve")
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        return TensorSpec(arg.name, DATATYPE_OF_ORT[arg.type], tuple(shape[1:] if max_batch else shape), optional)

    def from_config(t, graph: dict, kind: str, optional: bool = False) -> TensorSpec:
        if t.name not in graph:
            raise ModelLoadError(f"config {kind} {t.name!r} is not a {kind} of the ONNX graph (it has {sorted(graph)})")
        datatype = mc.DataType.Name(t.data_type).removeprefix("TYPE_")
        graph_type = DATATYPE_OF_ORT.get(graph[t.name].type)
        if datatype != graph_type:
            raise ModelLoadError(f"config {kind} {t.name!r} is {datatype} but the ONNX graph has {graph_type}")
        dims = tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims)
        return TensorSpec(t.name, datatype, dims, optional)

    listed_in = {t.name for t in config.input}
    inputs = [from_config(t, graph_in, "input", t.optional) for t in config.input]
    inputs += [from_graph(a) for a in graph_inputs if a.name not in listed_in]
    listed_out = {t.name for t in config.output}
    outputs = [from_config(t, graph_out, "output") for t in config.output]
    outputs += [from_graph(a) for a in graph_outputs if a.name not in listed_out]

    decoder = DecoderGraph.of({t.name: (t.dims, t.dtype) for t in inputs}, [t.name for t in outputs])
    if decoder is not None:
        # the convention's inputs other than input_ids are filled in when a request leaves them out
        inputs = [t if t.name == INPUT_IDS else dataclasses.replace(t, optional=True) for t in inputs]

    params = {k: v.string_value for k, v in config.parameters.items()}
    db = config.dynamic_batching
    latency_ms = _positive(params, "tserve.latency_target_ms", float)
    batching_on = max_batch > 0 and (config.HasField("dynamic_batching") or not has_config_tensors)
    batching = BatchingPolicy(
        enabled=batching_on,
        max_batch_size=max_batch,
        preferred_batch_sizes=tuple(sorted(db.preferred_batch_size)),
        max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
        max_queue_size=db.default_queue_policy.max_queue_size or default_max_queue_size,
        latency_target_s=latency_ms / 1e3 if latency_ms else None,
    )
    export = read_export_metadata(entry.path)
    if export.image_shape is not None:  # an image model's symbolic [C, H, W], as its config.json says
        inputs = [
            dataclasses.replace(t, dims=export.image_shape)
            if t.name == PIXEL_VALUES and len(t.dims) == 3 and -1 in t.dims and max_batch
            else t
            for t in inputs
        ]
    padding = PaddingRules(
        pad_values=_parse_map(params.get("tserve.pad_values", "")),
        unpad_outputs=tuple(s.strip() for s in params.get("tserve.unpad_outputs", "").split(",") if s.strip()),
    )
    for name in padding.pad_values:
        if name not in {t.name for t in inputs}:
            raise ModelLoadError(f"tserve.pad_values names {name!r}, which is not an input")
    if not padding.pad_values and not has_config_tensors:
        # a BERT-style encoder with no config batches mixed lengths by itself
        rules = encoder.padding_rules(
            [t.name for t in inputs], {t.name: t.dims for t in outputs}, export.pad_token_id or 0, export.head
        )
        if rules is not None:
            padding = PaddingRules(*rules)
            if config.max_batch_size == 0 and max_batch:  # rows are cheap when the token budget bounds them
                max_batch = ENCODER_MAX_BATCH_SIZE
                batching = dataclasses.replace(batching, max_batch_size=max_batch)
            if batching.enabled:
                batching = dataclasses.replace(batching, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS)
    tokens = _positive(params, "tserve.max_batch_tokens", int)
    if tokens and padding.pad_values and batching.enabled:
        batching = dataclasses.replace(batching, max_batch_tokens=tokens)
    vocab = (
        params.get("tserve.vocab_size")
        or (manifest or {}).get("tokenizer", {}).get("vocab_size")
        or export.vocab_size
        or _logits_width(decoder, outputs)
    )
    max_len = (
        params.get("tserve.max_sequence_length")
        or (manifest or {}).get("generation", {}).get("max_context")
        or export.max_positions
    )
    # a genai folder's graph, or one whose manifest says so (tserve's own export), reads each
    # row's length from its attention mask
    if decoder is not None and (export.shared_kv or (manifest or {}).get("generation", {}).get("shared_kv")):
        decoder = shared_kv_decoder(decoder, export, int(max_len) if max_len else None)

    return ModelSpec(
        name=entry.name,
        version=entry.version,
        platform="onnxruntime_onnx",
        model_path=graph_file(entry),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_batch_size=max_batch,
        batching=batching,
        padding=padding,
        vocab_size=int(vocab) if vocab else None,
        token_inputs=tuple(
            s.strip() for s in params.get("tserve.token_inputs", "input_ids" if vocab else "").split(",") if s.strip()
        ),
        max_sequence_length=int(max_len) if max_len else None,
        manifest=manifest,
        decoder=decoder,
        eos_token_ids=export.eos_token_ids,
        tokenizer_file=export.tokenizer_file,
        chat_template=export.chat_template,
    )


def shared_kv_decoder(decoder: DecoderGraph, export: ExportMetadata, context: int | None) -> DecoderGraph:
    """A graph that reads row lengths from its mask (GroupQueryAttention: an onnxruntime-genai
    folder's, or export/gqa_graph.py's): generation keeps its cache in one buffer per past
    input, up to `context` columns wide, shared with the present (KVSlots). A genai graph's head
    size is dynamic and read from genai_config.json."""
    if not context:
        raise ModelLoadError(
            "no context length (genai_config.json's model.context_length, tserve.max_sequence_length or the "
            "manifest's generation.max_context): the shared KV buffer needs one"
        )
    past = decoder.past
    if export.head_size:
        past = tuple(dataclasses.replace(p, head_dim=export.head_size) for p in past)
    return dataclasses.replace(decoder, past=past, shared_kv=True, max_length=context)


def _logits_width(decoder, outputs: list[TensorSpec]) -> int | None:
    """A decoder's vocabulary from its logits' last dimension, when the graph fixes it."""
    if decoder is None:
        return None
    logits = next((t for t in outputs if t.name == "logits"), None)
    return logits.dims[-1] if logits is not None and logits.dims and logits.dims[-1] > 0 else None


def completed_config(spec: ModelSpec, config: mc.ModelConfig) -> mc.ModelConfig:
    """The config as served by the ModelConfig RPC: the file's, with auto-completed tensors."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    out.max_batch_size = spec.max_batch_size
    listed_in, listed_out = {t.name for t in out.input}, {t.name for t in out.output}
    for t in spec.inputs:
        if t.name not in listed_in:
            out.input.add(
                name=t.name, data_type=mc.DataType.Value("TYPE_" + t.datatype), dims=list(t.dims), optional=t.optional
            )
    for t in spec.outputs:
        if t.name not in listed_out:
            out.output.add(name=t.name, data_type=mc.DataType.Value("TYPE_" + t.datatype), dims=list(t.dims))
    if spec.batching.enabled and not out.HasField("dynamic_batching"):
        out.dynamic_batching.SetInParent()
    return out


def seq2seq_spec(
    entry: VersionEntry, decoder_outputs: list, with_past_inputs: list, manifest: dict | None
) -> ModelSpec:
    """The spec of an encoder-decoder export folder (three graphs, Optimum's seq2seq layout):
    token ids in, generation only. Vocabulary, special tokens and lengths come from the
    export's config.json / generation_config.json, then its logits' width."""
    export = read_export_metadata(entry.path)
    logits = next((a for a in decoder_outputs if a.name == "logits"), None)
    if logits is None or logits.type not in DATATYPE_OF_ORT:
        raise ModelLoadError("decoder_model.onnx has no logits output of a type tserve serves")
    try:
        graphs = Seq2SeqGraphs.from_outputs(
            [a.name for a in decoder_outputs],
            [a.name for a in with_past_inputs],
            DATATYPES[DATATYPE_OF_ORT[logits.type]],
        )
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    width = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
    vocab = export.vocab_size or width
    pad = export.pad_token_id if export.pad_token_id is not None else 0
    start = export.decoder_start_token_id if export.decoder_start_token_id is not None else pad
    max_source = export.max_positions or 512
    max_new = (export.max_length - 1) if export.max_length and export.max_length > 1 else max_source
    return ModelSpec(
        name=entry.name,
        version=entry.version,
        platform="onnxruntime_onnx",
        model_path=entry.path / ENCODER,
        inputs=(TensorSpec("input_ids", "INT64", (-1,)), TensorSpec("attention_mask", "INT64", (-1,), True)),
        outputs=(TensorSpec("logits", DATATYPE_OF_ORT[logits.type], (-1, vocab or -1)),),
        max_batch_size=0,
        batching=BatchingPolicy(enabled=False, max_batch_size=0),
        padding=PaddingRules(pad_values={"input_ids": pad}),
        vocab_size=vocab,
        token_inputs=("input_ids",),
        max_sequence_length=max_source,
        manifest=manifest,
        eos_token_ids=export.eos_token_ids,
        tokenizer_file=export.tokenizer_file,
        chat_template=export.chat_template,
        seq2seq=graphs,
        decoder_start_token_id=start,
        max_new_tokens=max_new,
    )
