"""The encoder-decoder end to end: a tiny model exported in Optimum's seq2seq layout (greedy
parity with PyTorch checked by the export), served with continuous batching. Every answer,
alone or sharing decode runs with sources and outputs of other lengths, must equal the graphs'
own greedy decoding of that source alone; the Optimum-shaped variant (no decoder attention
mask) must give the same through its group-by-length road."""

from __future__ import annotations

import json
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from export.seq2seq import export_entry, onnx_greedy
from model.naming import Example
from model.seq2seq import Seq2Seq, Seq2SeqConfig
from model.train_seq2seq import NamingTokenizer
from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.launcher import ServerProcess

CFG = Seq2SeqConfig(
    d_model=32, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, n_head=2, max_source=64, max_target=14, dropout=0.0
)
SOURCES = [
    b"def _(x):\n    return x + 1",
    b"def _(self):\n  pass",
    b"x",
    b"def _(a, b):\n    return a * b\n" * 2,
    b"class A:\n  def _(self): return self.items.pop()",
    b"def _(path):\n    return open(path).read()",
]
NEW = CFG.max_target - 2


@pytest.fixture(scope="module")
def seq2seq_repository(tmp_path_factory) -> Path:
    """A random model whose weights are wide enough that its outputs depend on the source."""
    torch.manual_seed(0)
    model = Seq2Seq(CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
    tmp = tmp_path_factory.mktemp("s2s")
    ckpt = tmp / "model.pt"
    torch.save(
        {
            "config": CFG.to_dict(),
            "model": model.state_dict(),
            "metrics": {"samples": [{"source": s.decode()} for s in SOURCES]},
        },
        ckpt,
    )
    repo = tmp / "repo"
    export_entry(ckpt, repo, "namegen")
    export_entry(ckpt, repo, "namegen_optimum", decoder_attention_mask=False)

    # the same shape on a byte-level BPE (its special tokens first), shipped as tokenizer.json
    tok = NamingTokenizer.train([Example(s.decode(), "name", "") for s in SOURCES], 300)
    torch.manual_seed(0)
    model = Seq2Seq(tok.config(CFG))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
    torch.save(
        {
            "config": model.cfg.to_dict(),
            "tokenizer": tok.to_str(),
            "model": model.state_dict(),
            "metrics": {"samples": [{"source": s.decode()} for s in SOURCES]},
        },
        tmp / "bpe.pt",
    )
    export_entry(tmp / "bpe.pt", repo, "namegen_bpe")
    return repo


def references(repo: Path, name: str) -> list[list[int]]:
    return [onnx_greedy(repo / name / "1", [s], NEW)[0] for s in SOURCES]


def test_references_depend_on_the_source_and_batching_does_not_change_them(seq2seq_repository):
    alone = references(seq2seq_repository, "namegen")
    assert len({tuple(r) for r in alone}) >= 3, alone  # a model whose answers differ by source
    assert onnx_greedy(seq2seq_repository / "namegen" / "1", SOURCES, NEW) == alone  # right-padded batch
    assert references(seq2seq_repository, "namegen_optimum") == alone


@pytest.fixture(scope="module")
def s2s_server(seq2seq_repository):
    with ServerProcess(seq2seq_repository, "--generation-max-sequences", "4") as s:
        yield s


@pytest.mark.parametrize("model", ["namegen", "namegen_optimum"])
def test_continuous_batching_gives_every_request_its_own_greedy_answer(seq2seq_repository, s2s_server, model):
    want = references(seq2seq_repository, model)
    rng = np.random.default_rng(0)
    # sources of every length, outputs of several lengths: rows join and leave the running batch
    jobs = [(int(i), int(n)) for i, n in zip(rng.integers(0, len(SOURCES), 36), rng.integers(1, NEW + 1, 36))]
    with grpc.insecure_channel(s2s_server.address) as ch:
        stub = gen_grpc.TextGenerationStub(ch)

        def run(job):
            i, n = job
            return list(
                stub.Generate(
                    gen.GenerateRequest(model=model, token_ids=gen.TokenIds(ids=list(SOURCES[i])), max_new_tokens=n),
                    timeout=60,
                ).token_ids
            )

        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(run, jobs))
    for (i, n), tokens in zip(jobs, got):
        assert tokens == want[i][:n], (SOURCES[i], n)


def test_text_through_the_openai_api(s2s_server, seq2seq_repository):
    want = references(seq2seq_repository, "namegen")[0]
    body = json.dumps({"model": "namegen", "prompt": SOURCES[0].decode(), "max_tokens": NEW, "temperature": 0}).encode()
    doc = json.loads(
        urllib.request.urlopen(urllib.request.Request(s2s_server.http_url + "/v1/completions", body)).read()
    )
    assert doc["usage"]["prompt_tokens"] == len(SOURCES[0])  # the byte tokenizer: one token a byte
    assert doc["choices"][0]["text"] == bytes(t for t in want if t < 256).decode("utf-8", "replace")
    assert doc["choices"][0]["finish_reason"] == ("length" if len(want) == NEW else "stop")


def test_a_bpe_model_reads_and_writes_text_with_its_tokenizer_json(s2s_server, seq2seq_repository):
    tok = NamingTokenizer.from_checkpoint(torch.load(seq2seq_repository.parent / "bpe.pt", weights_only=False))
    assert (seq2seq_repository / "namegen_bpe" / "1" / "tokenizer.json").is_file() and tok.pad_id == 0
    answers = set()
    with grpc.insecure_channel(s2s_server.address) as ch:
        stub = gen_grpc.TextGenerationStub(ch)
        for source in SOURCES:
            ids = tok.encode(source.decode())
            want = onnx_greedy(seq2seq_repository / "namegen_bpe" / "1", [ids], NEW)[0]
            got = stub.Generate(
                gen.GenerateRequest(model="namegen_bpe", text=source.decode(), max_new_tokens=NEW), timeout=60
            )
            assert list(got.token_ids) == want and got.text == tok.decode(want)
            answers.add(got.text)
    assert len(answers) >= 3  # the answers depend on the source


def test_bad_requests_name_the_limit_and_model_infer_is_refused(s2s_server):
    with grpc.insecure_channel(s2s_server.address) as ch:
        stub = gen_grpc.TextGenerationStub(ch)
        with pytest.raises(grpc.RpcError) as long_source:
            stub.Generate(gen.GenerateRequest(model="namegen", text="x" * 65), timeout=30)
        assert long_source.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reads at most 64" in long_source.value.details()
        with pytest.raises(grpc.RpcError) as long_output:
            stub.Generate(gen.GenerateRequest(model="namegen", text="x", max_new_tokens=CFG.max_target), timeout=30)
        assert "longest output" in long_output.value.details()
    client = tc.InferenceServerClient(s2s_server.address)
    x = tc.InferInput("input_ids", [1, 2], "INT64")
    x.set_data_from_numpy(np.ones((1, 2), np.int64))
    with pytest.raises(InferenceServerException) as infer:
        client.infer("namegen", [x])  # no graph takes input_ids alone
    assert "encoder-decoder" in infer.value.message() and "StatusCode.INVALID_ARGUMENT" in infer.value.status()
    assert client.is_model_ready("namegen")
    client.close()


def infer_input(name: str, array: np.ndarray) -> tc.InferInput:
    x = tc.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
    x.set_data_from_numpy(array)
    return x


def test_model_infer_drives_each_graph_for_a_client_that_loops_itself(s2s_server, seq2seq_repository):
    """The encoder, then the first decoder pass, by ModelInfer: its first greedy token is the
    reference's."""
    want = references(seq2seq_repository, "namegen")[0]
    ids = np.array([list(SOURCES[0])], np.int64)
    mask = np.ones_like(ids)
    client = tc.InferenceServerClient(s2s_server.address)
    hidden = client.infer("namegen", [infer_input("input_ids", ids), infer_input("attention_mask", mask)]).as_numpy(
        "last_hidden_state"
    )
    assert hidden.shape == (1, ids.shape[1], CFG.d_model)
    start = np.full((1, 1), 257, np.int64)  # BOS, the decoder start token
    first = client.infer(
        "namegen",
        [
            infer_input("input_ids", start),
            infer_input("encoder_hidden_states", hidden),
            infer_input("encoder_attention_mask", mask),
        ],
        outputs=[tc.InferRequestedOutput("logits")],
    ).as_numpy("logits")
    client.close()
    assert int(first[0, -1].argmax()) == want[0]


def test_a_wrong_golden_answer_keeps_the_model_from_serving(seq2seq_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(seq2seq_repository / "namegen", repo / "namegen")
    manifest_path = repo / "namegen" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["golden"][0]["greedy"] = [7] * len(manifest["golden"][0]["greedy"]) + [7]
    manifest_path.write_text(json.dumps(manifest))
    with ServerProcess(repo) as server:
        client = tc.InferenceServerClient(server.address)
        [entry] = client.get_model_repository_index().models
        client.close()
    assert entry.state == "UNAVAILABLE" and "golden sample 0" in entry.reason
