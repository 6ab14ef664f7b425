"""Fused generation graphs derived from Optimum decoder exports (service/generation/derived_graph.py).

Each family is built from a config after a fixed seed with transformers (no Hub), exported by
optimum-cli, and its derived graph driven by the engine's shared-buffer cache (KVSlots) must
give the export's own graph's greedy tokens and logits (driven by KVRows), on rows of mixed
lengths batched together and on a prompt chunked across steps. Then a real server: a derived
graph is used, cached by checksum and reused, refused when it would change outputs, and never
tried when switched off.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from service.checks import generate_greedy
from service.conventions.decoder import DecoderGraph
from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.generation.derived_graph import NotDerivable, cached_derivation, derive
from service.generation.engine import EngineLimits, GenerationEngine
from service.generation.kv_rows import KVRows
from service.generation.kv_slots import KVSlots
from service.generation.sampling import SamplingParams
from service.generation.sequence import Sequence
from service.launcher import ServerProcess
from service.runtime import OrtRuntime
from tests.service.conftest import optimum_export

VOCAB = 96
CONTEXT = 64


def _build(kind: str, root: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **common)
    configs = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, rope_theta=500.0, **llama_like),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **llama_like),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=1, sliding_window=None, **llama_like),
        "phi3": lambda: tf.Phi3Config(num_key_value_heads=4, pad_token_id=0, **llama_like),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4),
    }
    config = configs[kind]()
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their initial ones and zeros, as trained ones are
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / "source")
    return optimum_export(root / "source", "text-generation-with-past", root / "optimum")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each family's export, built once for the module."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = _build(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


@pytest.fixture(params=["llama", "qwen2", "mistral", "phi3", "gpt2"])
def family(request, exports) -> tuple[str, Path]:
    return request.param, exports(request.param)


def _decoder(path: Path, fused: bool) -> tuple[DecoderGraph, OrtRuntime]:
    runtime = OrtRuntime(path, ["CPUExecutionProvider"], instances=1, intra_op_threads=1)
    inputs = {
        a.name: (
            tuple(d if isinstance(d, int) else -1 for d in a.shape[1:]),
            np.float32 if a.type == "tensor(float)" else np.int64,
        )
        for a in runtime.graph_inputs
    }
    graph = DecoderGraph.of(inputs, [a.name for a in runtime.graph_outputs])
    return (dataclasses.replace(graph, shared_kv=True, max_length=CONTEXT) if fused else graph), runtime


@pytest.mark.unit
def test_a_derived_graph_gives_the_exports_tokens_and_logits_batched_and_chunked(family, tmp_path):
    kind, folder = family
    fused_file = derive(folder / "model.onnx", json.loads((folder / "config.json").read_text()), tmp_path)
    (plain_graph, plain), (fused_graph, fused) = _decoder(folder / "model.onnx", False), _decoder(fused_file, True)
    rng = np.random.default_rng(0)
    jobs = [(rng.integers(1, VOCAB, size=n).tolist(), 12) for n in (3, 17, 9)]  # mixed lengths, one batch
    want = generate_greedy(lambda limits: KVRows(plain_graph, plain), jobs, record_logits=True)
    runs, run_binding = [], fused.run_binding
    fused.run_binding = lambda binding: runs.append(binding) or run_binding(binding)  # count the runs
    got = generate_greedy(lambda limits: KVSlots(fused_graph, fused, limits.max_sequences), jobs, record_logits=True)
    assert (
        len(runs) == 1 + 11
    )  # the three fresh prompts in one run, right-padded; then a decode a token after the first
    for w, g in zip(want, got):
        assert g.generated == w.generated, kind
        diff = max(float(np.abs(a - b).max()) for a, b in zip(w.logits_seen, g.logits_seen))
        assert diff < 1e-4, (kind, diff)
    # a prompt longer than a step's token budget runs in chunks over the shared buffer
    prompt = rng.integers(1, VOCAB, size=40).tolist()
    chunked = GenerationEngine(
        "chunks", lambda limits: KVSlots(fused_graph, fused, 2), EngineLimits(max_sequences=2, token_budget=8)
    )
    seq = Sequence("chunked", prompt, SamplingParams(), 8)
    chunked.run_here([seq])
    assert seq.generated == generate_greedy(lambda limits: KVRows(plain_graph, plain), [(prompt, 8)])[0].generated


@pytest.mark.unit
def test_what_is_not_derived_says_why(exports, tmp_path):
    folder = exports("llama")
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(NotDerivable, match="model_type 'bloom'"):
        derive(folder / "model.onnx", {**config, "model_type": "bloom"}, tmp_path)
    with pytest.raises(NotDerivable, match="rope scaling 'dynamic'"):
        derive(folder / "model.onnx", {**config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, tmp_path)
    with pytest.raises(NotDerivable, match="multiple of 16"):
        derive(folder / "model.onnx", {**config, "head_dim": 24}, tmp_path)


@pytest.mark.unit
def test_the_cache_is_keyed_by_the_exports_checksum(exports, tmp_path):
    folder = exports("gpt2")
    first = cached_derivation(folder / "model.onnx", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_derivation(folder / "model.onnx", tmp_path) == first and first.stat().st_mtime_ns == stamp
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    assert cached_derivation(changed / "model.onnx", tmp_path) != first
    assert len(list((tmp_path / "derived").iterdir())) == 2  # no half-written folders left either


# -- a real server ----------------------------------------------------------------------------


def _graph_metric(server: ServerProcess, model: str) -> str:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    found = re.findall(rf'tserve_generation_graph{{[^}}]*graph="(\w+)"[^}}]*model="{model}"[^}}]*}} 1\.0', text)
    found += re.findall(rf'tserve_generation_graph{{[^}}]*model="{model}"[^}}]*graph="(\w+)"[^}}]*}} 1\.0', text)
    assert len(found) == 1, text
    return found[0]


def _greedy(server: ServerProcess, model: str, prompt: list[int], n: int = 10) -> list[int]:
    with grpc.insecure_channel(server.address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        req = gen.GenerateRequest(model=model, max_new_tokens=n)
        req.token_ids.ids.extend(prompt)
        return list(stub.Generate(req, timeout=60).token_ids)


def test_a_server_generates_on_the_derived_graph_and_reuses_it(exports, tmp_path):
    llama_folder = exports("llama")
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    shutil.copytree(llama_folder, repo / "llama" / "1")
    broken = repo / "broken" / "1"  # a config that does not describe its weights: derived, refused
    shutil.copytree(llama_folder, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "rope_theta": 10.0}))
    prompt = [5, 17, 33, 2, 71, 8]
    env = {"TSERVE_CACHE_DIR": str(cache)}
    with ServerProcess(repo, env=env) as s:
        assert _graph_metric(s, "llama") == "derived"
        assert _graph_metric(s, "broken") == "plain"  # its outputs stay the export's own
        first = _greedy(s, "llama", prompt)
        assert _greedy(s, "broken", prompt) == first  # the same weights, the export's graph
    entries = {p.name: p.stat().st_mtime_ns for p in (cache / "derived").iterdir()}
    assert len(entries) == 2
    with ServerProcess(repo, env=env) as s:  # a second load reads the cached graph
        assert _graph_metric(s, "llama") == "derived"
        assert _greedy(s, "llama", prompt) == first
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "derived").iterdir()} == entries
    with ServerProcess(repo, env={**env, "TSERVE_GENERATION_FUSED_GRAPH": "off"}) as s:
        assert _graph_metric(s, "llama") == "plain"
        assert _greedy(s, "llama", prompt) == first
    with ServerProcess(repo, env={"TSERVE_CACHE_DIR": "/dev/null/cache"}) as s:  # unwritable: derived anyway
        assert _graph_metric(s, "llama") == "derived"
