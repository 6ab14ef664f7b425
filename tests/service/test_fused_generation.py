"""Generation on a fused graph with a shared KV buffer (GroupQueryAttention, KVSlots).

- An onnxruntime-genai model folder (model.onnx + genai_config.json, no config.pbtxt) is served
  as it is: concurrent streams of mixed lengths through fewer slots than streams give each
  prompt the model's own greedy tokens; ModelInfer gives the model's logits and refuses a
  left-padded mask, which such a graph would misread. The folder's graph is export/gqa_graph.py's, written
  from a tiny GPT after a fixed seed, with the genai_config.json the builder writes for it;
  genai's own builder needs a second environment (bench/genai_bench.py runs it).
- A fused generation graph named by a manifest beside a plain model.onnx is used only if it
  matches model.onnx at load: a wrong one is refused, the engine generates with model.onnx, the
  metric says so. (tserve's own bytegpt ships the fused graph alone, as model.onnx.)
"""

from __future__ import annotations

import asyncio
import copy
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import tritonclient.grpc as tcg
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from tritonclient.utils import InferenceServerException

from export.gqa_graph import GQA_FILE, export_gqa
from export.onnx_export import export_onnx
from model.transformer import GPT, GPTConfig
from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.metrics import Metrics
from service.generation.engine import EngineLimits
from service.generation.kv_rows import KVRows
from service.generation.kv_slots import KVSlots
from service.models import ModelManager
from service.settings import Settings
from service.launcher import ServerProcess

CONFIG = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64)
PROMPTS = [[5, 6, 7], [100, 3, 9, 200, 17, 1, 2, 3, 4, 8, 9], [42], [7, 7, 7, 7, 7], [250, 1], [11, 12, 13, 14, 15, 16]]
LENGTHS = [20, 5, 33, 12, 1, 26]


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def genai_config(cfg: GPTConfig) -> dict:
    """What onnxruntime-genai's builder writes beside its graph, for this model."""
    names = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    return {
        "model": {
            "type": "gpt",
            "context_length": cfg.block_size,
            "vocab_size": cfg.vocab_size,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "decoder": {
                "filename": "model.onnx",
                "head_size": cfg.head_dim,
                "hidden_size": cfg.d_model,
                "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_head,
                "num_hidden_layers": cfg.n_layer,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    **names,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {"do_sample": False, "max_length": cfg.block_size, "past_present_share_buffer": True},
    }


def test_a_genai_folder_serves_concurrent_streams_with_the_models_tokens(tiny, tmp_path):
    folder = tmp_path / "repo" / "gpt_genai" / "1"
    folder.mkdir(parents=True)
    export_gqa(tiny, folder / "model.onnx")
    (folder / "genai_config.json").write_text(json.dumps(genai_config(CONFIG)))
    want = [tiny.generate(p, n) for p, n in zip(PROMPTS, LENGTHS)]

    def stream(stub, i: int) -> list[int]:
        request = gen.GenerateRequest(
            model="gpt_genai",
            token_ids=gen.TokenIds(ids=PROMPTS[i]),
            max_new_tokens=LENGTHS[i],
            ignore_eos=True,
            sampling=gen.SamplingParameters(temperature=0.0),
        )
        return [t for m in stub.GenerateStream(request, timeout=60) for t in m.token_ids]

    def infer(client, mask: list[int]):
        ids = tcg.InferInput("input_ids", [1, len(mask)], "INT64")
        ids.set_data_from_numpy(np.array([PROMPTS[1][: len(mask)]], np.int64))
        m = tcg.InferInput("attention_mask", [1, len(mask)], "INT64")
        m.set_data_from_numpy(np.array([mask], np.int64))
        return client.infer("gpt_genai", [ids, m], outputs=[tcg.InferRequestedOutput("logits")]).as_numpy("logits")

    with ServerProcess(tmp_path / "repo", "--generation-max-sequences", "3") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                got = list(pool.map(lambda i: stream(stub, i), range(len(PROMPTS))))
            alone = [stream(stub, i) for i in range(2)]
        # ModelInfer reaches the graph as sent; a left-padded mask, which it would misread, is refused
        client = tcg.InferenceServerClient(server.address)
        with torch.no_grad():
            want_logits = tiny(torch.tensor([PROMPTS[1][:4]]))[0].numpy()
        np.testing.assert_allclose(infer(client, [1, 1, 1, 1]), want_logits, atol=1e-4)
        with pytest.raises(InferenceServerException) as refused:
            infer(client, [0, 0, 1, 1])
    assert got == want and alone == want[:2]
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "pad on the right" in refused.value.message()


def load(repository, name: str):
    async def main():
        registry = CollectorRegistry()
        manager = ModelManager(Settings(model_repository=repository), Metrics(registry))
        await manager.load(name)
        mv = manager.get(name)
        state = (mv.make_cache(EngineLimits()), generate_latest(registry).decode())  # the engine's cache
        await manager.close()
        return state

    return asyncio.run(main())


def test_a_fused_graph_that_differs_from_model_onnx_is_not_used(tiny, tmp_path):
    """A plain decoder (torch.onnx's graph) whose manifest names a fused generation graph
    beside it: the fused graph is used when, driven by the engine, it gives model.onnx's logits;
    one written from other weights is refused at load, and the model generates with model.onnx."""
    version = tmp_path / "repo" / "gpt" / "1"
    export_onnx(tiny, version / "model.onnx")
    export_gqa(tiny, version / GQA_FILE)
    manifest = {"generation": {"max_context": CONFIG.block_size, "eos_token_id": 0, "graph": GQA_FILE}}
    (version / "manifest.json").write_text(json.dumps(manifest))
    cache, metrics = load(tmp_path / "repo", "gpt")
    assert isinstance(cache, KVSlots) and cache.graph.shared_kv
    assert 'tserve_generation_graph{graph="fused",model="gpt",version="1"} 1.0' in metrics

    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.blocks[0].attn.v_proj.bias.add_(0.5)
    export_gqa(other, version / GQA_FILE)
    cache, metrics = load(tmp_path / "repo", "gpt")
    assert isinstance(cache, KVRows)
    assert 'tserve_generation_graph{graph="plain",model="gpt",version="1"} 1.0' in metrics
    assert 'tserve_generation_graph{graph="fused",model="gpt",version="1"} 0.0' in metrics


def test_rows_of_mixed_lengths_share_one_buffer_exactly(tiny, tmp_path):
    """The layout itself, in raw ONNX Runtime: rows of different lengths, each from column 0
    (right-padded), in one buffer bound as past and present, give each row the logits it gets
    alone."""
    import onnxruntime as ort

    path = export_gqa(tiny, tmp_path / "gqa.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    H, D, L = CONFIG.n_head, CONFIG.head_dim, CONFIG.block_size
    names = [f"past_key_values.{i}.{k}" for i in range(CONFIG.n_layer) for k in ("key", "value")]
    rows = [PROMPTS[1], PROMPTS[0], PROMPTS[4]]  # 11, 3 and 2 tokens
    with torch.no_grad():
        want = [tiny(torch.tensor([p]))[0][0, -1].numpy() for p in rows]
    buffers = {n: np.zeros((len(rows), H, L, D), np.float32) for n in names}
    values = {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in buffers.items()}
    # prefill all but each row's last token into the buffer, one row at a time
    for r, p in enumerate(rows):
        feeds = {
            "input_ids": np.array([p[:-1]], np.int64),
            "attention_mask": np.ones((1, len(p) - 1), np.int64),
            "position_ids": np.arange(len(p) - 1, dtype=np.int64)[None],
        }
        feeds.update({n: np.zeros((1, H, 0, D), np.float32) for n in names})
        presents = session.run([n.replace("past_key_values", "present") for n in names], feeds)
        for n, present in zip(names, presents):
            buffers[n][r, :, : present.shape[2]] = present[0]
    lengths = np.array([len(p) - 1 for p in rows])  # cached tokens per row: 10, 2, 1
    binding = session.io_binding()
    binding.bind_output("logits")
    for n in names:
        binding.bind_ortvalue_input(n, values[n])
        binding.bind_ortvalue_output(n.replace("past_key_values", "present"), values[n])
    last = np.array([[p[-1]] for p in rows], np.int64)
    binding.bind_cpu_input("input_ids", last)
    binding.bind_cpu_input("attention_mask", (np.arange(lengths.max() + 1)[None] <= lengths[:, None]).astype(np.int64))
    binding.bind_cpu_input("position_ids", lengths[:, None].astype(np.int64))
    session.run_with_iobinding(binding)
    got = binding.get_outputs()[0].numpy()[:, -1]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-4)


def test_a_shared_buffer_above_the_limit_is_refused_with_the_figure(tiny, tmp_path):
    """The buffer is reserved whole at load: 64 sequences x 64 tokens x 2 layers of this model
    is 2 MiB, above a 1 MiB limit: UNAVAILABLE, saying what it needs and what to lower."""
    folder = tmp_path / "gpt_genai" / "1"
    folder.mkdir(parents=True)
    export_gqa(tiny, folder / "model.onnx")
    (folder / "genai_config.json").write_text(json.dumps(genai_config(CONFIG)))

    async def main():
        settings = Settings(
            model_repository=tmp_path, generation_max_sequences=64, generation_kv_buffer_max_bytes=1 << 20
        )
        manager = ModelManager(settings, Metrics(CollectorRegistry()))
        await manager.load("gpt_genai")
        mv = manager._models["gpt_genai"][1]
        await manager.close()
        return mv

    mv = asyncio.run(main())
    assert not mv.ready and "needs 2 MiB" in mv.reason and "--generation-max-sequences" in mv.reason
