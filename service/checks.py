"""Load-time checks of a model version: its files, its golden outputs, its generation.

A version serves only after these pass (service/models.py runs them while loading):

    check_manifest_files   every file the manifest lists is there with its sha256
    check_golden           the manifest's golden inputs give its golden outputs (ModelInfer's
                           road, on every instance)
    fused_mismatch         a fused generation graph gives the model graph's logits, both
                           driven by the real generation engine
    check_seq2seq_golden   an encoder-decoder's engine gives the manifest's greedy answers

plus the warm-up and the timed runs that seed the batch policy. Generation is checked through
the engine itself (GenerationEngine.run_here): no decoding loop is written here, so what is
checked is what serves.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from service.conventions.decoder import DecoderGraph
from service.errors import ModelLoadError
from service.generation.engine import CacheFactory, EngineLimits, GenerationEngine
from service.generation.kv_rows import KVRows
from service.generation.kv_slots import KVSlots
from service.generation.sampling import SamplingParams
from service.generation.sequence import FinishReason, Sequence
from service.graph_limits import discover_position_limit
from service.runtime import OrtRuntime
from service.types import DATATYPES, ModelSpec


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
    """Re-run the manifest's golden inputs; a mismatch means a corrupt or wrong model. A record
    with `"positions": "last"` holds its outputs at the last sequence position only."""
    for i, golden in enumerate((spec.manifest or {}).get("golden", [])):
        feeds = {name: _tensor(rec) for name, rec in golden["inputs"].items()}
        names = list(golden["outputs"])
        for instance_outputs in runtime.run_each(feeds, names):
            if golden.get("positions") == "last":
                instance_outputs = [out[:, -1:] for out in instance_outputs]
            _compare_golden(i, golden, names, instance_outputs)


def _compare_golden(i: int, golden: dict, names: list[str], outputs: list[np.ndarray]) -> None:
    for name, got in zip(names, outputs):
        want = _tensor(golden["outputs"][name])
        if got.shape != want.shape:
            raise ModelLoadError(
                f"golden sample {i}: output {name!r} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        diff = float(np.abs(got - want).max()) if got.size else 0.0
        if not diff <= golden.get("atol", 1e-4):
            raise ModelLoadError(
                f"golden sample {i}: output {name!r} differs by {diff:.3g} (atol {golden.get('atol', 1e-4)})"
            )


def generate_greedy(
    make_cache: CacheFactory,
    jobs: list[tuple[list[int], int]],
    eos: frozenset[int] = frozenset(),
    record_logits: bool = False,
) -> list[Sequence]:
    """Greedy generation of (prompt, max_new_tokens) jobs on an engine of its own, run on the
    calling thread, all at once (so batching is part of what is checked). A sequence that fails
    raises ModelLoadError with its error."""
    # the checks run the plain path: no prefix kept between their prompts
    engine = GenerationEngine(
        "load-check", make_cache, EngineLimits(max_sequences=max(1, len(jobs)), prefix_cache_bytes=0)
    )
    seqs = [
        Sequence(
            f"load-check-{i}",
            list(prompt),
            SamplingParams(),
            max_new,
            eos_token_ids=eos,
            logits_seen=[] if record_logits else None,
        )
        for i, (prompt, max_new) in enumerate(jobs)
    ]
    engine.run_here(seqs)
    for seq in seqs:
        if seq.finish_reason == FinishReason.ERROR:
            error = seq.outbox[-1].error
            raise ModelLoadError(f"generation failed: {error.message if error else 'unknown error'}")
    return seqs


FUSED_ATOL = 1e-3  # largest |logit difference| a fused generation graph may show against model.onnx
FUSED_CHECK_STEPS = 3  # decode steps checked after the prompt


def fused_mismatch(spec: ModelSpec, plain: OrtRuntime, fused: OrtRuntime, graph: DecoderGraph) -> str | None:
    """Why a fused generation graph may not stand in for the model's graph, or None. It must
    take the same inputs and, each driven by the engine (model.onnx on its own rows, the fused
    graph on a shared buffer), give model.onnx's logits within FUSED_ATOL on the golden prompt
    (a fixed one where the manifest has none) and on the FUSED_CHECK_STEPS greedy decode steps
    after it, both graphs fed model.onnx's tokens."""
    if {a.name for a in fused.graph_inputs} != {a.name for a in plain.graph_inputs}:
        return "takes other inputs than model.onnx"
    if not graph.max_length:
        return "needs the model's context length for its KV buffer, and none is known"
    golden = (spec.manifest or {}).get("golden", [])
    prompt = (
        _tensor(golden[0]["inputs"]["input_ids"])[0]
        if golden
        else np.arange(1, 9, dtype=np.int64) % (spec.vocab_size or 2)
    ).tolist()
    steps = FUSED_CHECK_STEPS + 1
    want = generate_greedy(lambda limits: KVRows(spec.decoder, plain), [(prompt, steps)], record_logits=True)[0]
    diff, done = 0.0, 0  # logits compared so far
    while done < steps:
        # the fused graph from model.onnx's tokens so far: where the two chose differently (a
        # near tie), it goes on from model.onnx's choice, so every step is compared
        got = generate_greedy(
            lambda limits: KVSlots(graph, fused, limits.max_sequences),
            [(prompt + want.generated[:done], steps - done)],
            record_logits=True,
        )[0]
        for g, token in zip(got.logits_seen, got.generated):
            w = want.logits_seen[done]
            diff = max(diff, float(np.abs(g - w).max()) if g.shape == w.shape else float("inf"))
            done += 1
            if token != want.generated[done - 1]:
                break
    return (
        None
        if diff <= FUSED_ATOL
        else (
            f"differs from model.onnx by {diff:.3g} on the golden prompt and "
            f"{FUSED_CHECK_STEPS} decode steps (at most {FUSED_ATOL} allowed)"
        )
    )


def check_seq2seq_golden(spec: ModelSpec, make_cache: CacheFactory) -> None:
    """The engine's greedy answers to the manifest's golden sources are its answers (the
    end-of-sequence token not counted)."""
    golden = (spec.manifest or {}).get("golden", [])
    if not golden:
        return
    seqs = generate_greedy(make_cache, [(g["source_ids"], g["max_new_tokens"]) for g in golden], spec.eos_token_ids)
    for i, (g, seq) in enumerate(zip(golden, seqs)):
        got = seq.generated[:-1] if seq.finish_reason == FinishReason.EOS else seq.generated
        if got != g["greedy"]:
            raise ModelLoadError(
                f"golden sample {i}: greedy tokens {got[:8]}... differ from the manifest's {g['greedy'][:8]}..."
            )


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


def probe_position_limit(spec: ModelSpec, runtime: OrtRuntime) -> int | None:
    """For a model that declares no length limit: its graph's position table, confirmed by a run
    at that length and a failing one past it (service/graph_limits.py), so over-long requests are
    refused before compute with the limit named instead of failing inside ONNX Runtime."""
    variable = any(-1 in t.dims for t in spec.inputs if t.name in spec.token_inputs) or spec.decoder is not None
    if not variable:
        return None
    outputs = [t.name for t in spec.outputs]

    def runs_at(length: int) -> bool:
        feeds = warm_up_feeds(spec, 1, length)
        for name, value in feeds.items():  # positions as a client sends them: 0 .. length-1
            if "position" in name and value.shape[-1:] == (length,):
                feeds[name] = np.broadcast_to(np.arange(length, dtype=value.dtype), value.shape).copy()
        try:
            runtime.sessions[0].run(outputs, feeds)
            return True
        except Exception:
            return False

    return discover_position_limit(spec.model_path, spec.vocab_size, runs_at, spec.name)


def warm_up(spec: ModelSpec, runtime: OrtRuntime) -> None:
    """Run every instance once so no first request pays for allocation and kernel setup."""
    runtime.run_each(warm_up_feeds(spec), [t.name for t in spec.outputs])


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
