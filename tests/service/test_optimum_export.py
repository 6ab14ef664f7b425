"""A Hugging Face model exported by Optimum, dropped into the repository with no config.pbtxt:
served with limits, end-of-sequence and tokenizer read from the export folder, and checked
against transformers itself. The model is built here from a config after a fixed seed (no
Hub), with a byte-level BPE tokenizer trained on this repository's own source."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from tests.conftest import ROOT
from tests.service.conftest import VOCAB, POSITIONS, optimum_export
from service.launcher import ServerProcess

PROMPTS = ["def forward(self, x):", "import torch\n", "class Config:", "return self.proj(y)"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[object, Path]:
    """(a tiny BertModel, its Optimum feature-extraction export)."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).eval()
    model.save_pretrained(root / "source")
    return model, optimum_export(root / "source", "feature-extraction", root / "onnx")


@pytest.fixture(scope="module")
def reference(references):
    return references["gpt2"]


@pytest.fixture(scope="module")
def server(export, llama, bert, tmp_path_factory):
    repo = tmp_path_factory.mktemp("optimum_repo")
    shutil.copytree(export[1], repo / "gpt2" / "1")  # the folders as Optimum wrote them, nothing added
    shutil.copytree(llama[1], repo / "llama" / "1")
    shutil.copytree(bert[1], repo / "bert" / "1")
    with ServerProcess(repo) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield gen_grpc.TextGenerationStub(channel)


def expected(reference, prompt: str, n: int) -> list[int]:
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def generate(prompt: str | list[int], n: int, model: str = "gpt2") -> gen.GenerateRequest:
    req = gen.GenerateRequest(model=model, max_new_tokens=n)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_greedy_generation_equals_transformers_alone_and_in_a_busy_batch(stub, references, model):
    reference = references[model]
    _, tokenizer = reference
    want = [expected(reference, p, 24) for p in PROMPTS]
    alone = [stub.Generate(generate(p, 24, model), timeout=60) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:  # four copies of each, all at once
        together = list(pool.map(lambda p: stub.Generate(generate(p, 24, model), timeout=60), PROMPTS * 4))
    matched_alone = sum(list(r.token_ids) == w for r, w in zip(alone, want))
    matched_batch = sum(list(r.token_ids) == w for r, w in zip(together, want * 4))
    print(
        f"{model}: greedy ids equal transformers' generate: {matched_alone}/{len(want)} alone, "
        f"{matched_batch}/{len(together)} in a busy batch"
    )
    assert matched_alone == len(want) and matched_batch == len(together)
    assert [r.text for r in alone] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in want]
    streamed = list(stub.GenerateStream(generate(PROMPTS[0], 24, model), timeout=60))
    assert "".join(m.text for m in streamed) == alone[0].text


def test_model_infer_with_only_input_ids_matches_transformers(server, reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPTS[0], return_tensors="np").input_ids.astype(np.int64)
    client = tc.InferenceServerClient(server.address)
    x = tc.InferInput("input_ids", list(ids.shape), "INT64")
    x.set_data_from_numpy(ids)
    logits = client.infer("gpt2", [x], outputs=[tc.InferRequestedOutput("logits")]).as_numpy("logits")
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    diff = float(np.abs(logits - want).max())
    print(f"ModelInfer logits vs transformers: max abs diff {diff:.2e}")
    assert diff < 1e-4


def test_limits_come_from_the_export_and_bad_requests_harm_no_one(server, stub, reference):
    """Out-of-vocabulary ids and prompts past the model's positions are refused before compute,
    for both APIs, while valid streams running at the same time get exactly their tokens."""
    want = [expected(reference, p, 40) for p in PROMPTS]
    long_prompt = list(range(1, 120))
    bad = [
        (generate([5, VOCAB + 7, 9], 8), "vocabulary"),
        (generate(long_prompt, 20), "exceeds"),  # 119 + 20 > 128 positions
        (generate(list(range(1, POSITIONS + 5)), 4), "context is 128"),
    ]
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(stub.Generate, generate(p, 40), timeout=60) for p in PROMPTS]
        refused = [pool.submit(stub.Generate, req, timeout=60) for req, _ in bad]
        for (req, message), future in zip(bad, refused):
            with pytest.raises(grpc.RpcError) as info:
                future.result()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
        assert [list(f.result().token_ids) for f in good] == want
    client = tc.InferenceServerClient(server.address)
    for ids, message in (
        (np.full((1, POSITIONS + 1), 7, np.int64), "maximum sequence length 128"),
        (np.array([[3, VOCAB + 1]], np.int64), "vocabulary [0, 300)"),
    ):
        x = tc.InferInput("input_ids", list(ids.shape), "INT64")
        x.set_data_from_numpy(ids)
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT") as info:
            client.infer("gpt2", [x])
        assert message in str(info.value)


def test_cli_takes_token_ids_and_prints_ids(server, reference):
    _, tokenizer = reference
    ids = tokenizer(PROMPTS[1]).input_ids
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "generate",
            "--token-ids",
            ",".join(map(str, ids)),
            "--model",
            "gpt2",
            "--url",
            server.address,
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert [int(t) for t in res.stdout.strip().strip(",").split(",")] == expected(reference, PROMPTS[1], 6)


def test_a_bert_export_batches_mixed_lengths_with_no_config(server, bert):
    """Padding rules come from the encoder convention: requests of different lengths share
    batches, and each gets exactly transformers' last_hidden_state for its own tokens."""
    model, _ = bert
    rng = np.random.default_rng(0)
    requests = [rng.integers(1, 100, (1, int(n))) for n in rng.integers(3, 40, 48)]

    def infer(ids: np.ndarray) -> np.ndarray:
        client = tc.InferenceServerClient(server.address)
        inputs = []
        for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("token_type_ids", ids * 0)):
            x = tc.InferInput(name, list(value.shape), "INT64")
            x.set_data_from_numpy(value)
            inputs.append(x)
        return client.infer("bert", inputs).as_numpy("last_hidden_state")

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(infer, requests))
    diffs = []
    with torch.no_grad():
        for ids, out in zip(requests, got):
            want = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
            assert out.shape == want.shape
            diffs.append(float(np.abs(out - want).max()))
    print(f"BERT last_hidden_state vs transformers: {len(diffs)} requests, max abs diff {max(diffs):.2e}")
    assert max(diffs) < 1e-5
    stats = tc.InferenceServerClient(server.address).get_inference_statistics("bert").model_stats[0]
    print(f"BERT: {stats.inference_count} rows in {stats.execution_count} runs")
