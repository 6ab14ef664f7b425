"""Text embeddings as a product, through a real server and real clients: a BERT built from a
config after a fixed seed with a WordPiece tokenizer trained here, exported by `optimum-cli`
(feature extraction) and dropped into the repository as the folders users have: the Optimum
export as written, and sentence-transformers snapshots (graph under onnx/, modules.json,
1_Pooling/config.json) pooling by mean with Normalize, and by CLS. Every answer is compared
with transformers' own token states, pooled and normalised as sentence-transformers does."""

from __future__ import annotations

import base64
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch

from export.sentence_transformers import write_snapshot
from service.launcher import ServerProcess
from tests.service.conftest import optimum_export, post, wordpiece

MAX_POSITIONS, ST_MAX_LENGTH = 64, 40
TEXTS = [
    "def forward(self, x):",
    "import torch",
    "return self.proj(y) + x",
    "class Config: pass",
    "a much longer line of source text that keeps going with words and words and words",
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(transformers' BertModel and tokenizer, the Optimum export folder)."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert_embed")
    tok, fast = wordpiece()
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS,
        )
    ).eval()
    model.save_pretrained(root / "source")
    fast.save_pretrained(root / "source")
    return model, fast, optimum_export(root / "source", "feature-extraction", root / "onnx")


def snapshot(export, folder, pooling: str, normalize: bool) -> None:
    write_snapshot(export, folder, 32, pooling, normalize, ST_MAX_LENGTH)


@pytest.fixture(scope="module")
def server(bert, tmp_path_factory):
    _, _, export = bert
    repo = tmp_path_factory.mktemp("embed_repo")
    shutil.copytree(export, repo / "bert" / "1")  # as Optimum wrote it: mean pooling by default
    snapshot(export, repo / "minilm" / "1", "mean_tokens", normalize=True)
    snapshot(export, repo / "bert_cls" / "1", "cls_token", normalize=False)
    with ServerProcess(repo) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)


def reference(bert, texts: list[str], pooling: str = "mean", normalize: bool = True, max_length: int | None = None):
    model, tokenizer, _ = bert
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=max_length is not None, max_length=max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            states = model(input_ids=ids).last_hidden_state[0].numpy().astype(np.float64)
        v = states[0] if pooling == "cls" else states.mean(0)
        out.append(v / np.linalg.norm(v) if normalize else v)
    return np.array(out)


def test_openai_embeddings_equal_sentence_transformers(server, oai, bert):
    """The real openai client on the snapshot (mean pooling, Normalize): transformers' vectors
    within 1e-4, in input order, with the tokens counted; base64 the same floats; dimensions
    the first d components normalised again; token ids as input."""
    res = oai.embeddings.create(model="minilm", input=TEXTS)
    got = np.array([d.embedding for d in res.data])
    want = reference(bert, TEXTS)
    print(f"embeddings vs transformers: max abs diff {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert [d.index for d in res.data] == list(range(len(TEXTS)))
    _, tokenizer, _ = bert
    assert res.usage.prompt_tokens == res.usage.total_tokens == sum(len(tokenizer(t).input_ids) for t in TEXTS)
    # the client asks for base64 itself when no format is named, and decodes it (above); named, it
    # hands the string over: little-endian float32
    b64 = oai.embeddings.create(model="minilm", input=TEXTS[:2], encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in b64.data]
    np.testing.assert_allclose(decoded, got[:2], atol=1e-7)
    _, floats = post(server, "/v1/embeddings", {"model": "minilm", "input": TEXTS[:2], "encoding_format": "float"})
    np.testing.assert_allclose([d["embedding"] for d in floats["data"]], got[:2], atol=1e-7)
    small = np.array([d.embedding for d in oai.embeddings.create(model="minilm", input=TEXTS, dimensions=8).data])
    cut = want[:, :8] / np.linalg.norm(want[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(small, cut, atol=1e-4)
    ids = tokenizer(TEXTS[0]).input_ids
    by_ids = oai.embeddings.create(model="minilm", input=[ids]).data[0].embedding
    np.testing.assert_allclose(by_ids, got[0], atol=1e-6)


def test_tei_embed_on_every_layout(server, bert):
    """TEI's /embed: the Optimum folder pools by mean (normalised by default, raw with normalize
    false), the CLS snapshot by its first token; the model is named since three are loaded."""
    status, vectors = post(server, "/embed", {"model": "bert", "inputs": TEXTS})
    assert status == 200
    np.testing.assert_allclose(vectors, reference(bert, TEXTS), atol=1e-4)
    _, raw = post(server, "/embed", {"model": "bert", "inputs": TEXTS[1], "normalize": False})
    np.testing.assert_allclose(raw, reference(bert, TEXTS[1:2], normalize=False), atol=1e-4)
    _, cls = post(server, "/embed", {"model": "bert_cls", "inputs": TEXTS})
    np.testing.assert_allclose(cls, reference(bert, TEXTS, pooling="cls"), atol=1e-4)
    status, error = post(server, "/embed", {"inputs": "x"})
    assert status == 400 and "serves 3 models" in error["error"] and error["error_type"] == "Validation"


def test_many_texts_in_one_request_share_batches_with_others(oai, bert):
    """40 texts in one request (past the model's 8-row batches) beside 8 concurrent one-text
    requests: every vector is its text's."""
    texts = [f"{TEXTS[i % 5]} {i}" for i in range(40)]
    with ThreadPoolExecutor(9) as pool:
        big = pool.submit(oai.embeddings.create, model="minilm", input=texts)
        small = [pool.submit(oai.embeddings.create, model="minilm", input=t) for t in texts[:8]]
        got = np.array([d.embedding for d in big.result().data])
        singles = np.array([f.result().data[0].embedding for f in small])
    want = reference(bert, texts)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(singles, want[:8], atol=1e-4)


def test_over_long_text_is_refused_unless_truncate_and_harms_no_one(server, oai, bert):
    """Past the snapshot's max_seq_length (40): 400 naming the limit; with truncate, the vector
    of the text cut to 40 tokens; valid requests at the same time keep their vectors."""
    long_text = " ".join(["token"] * 80)
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(oai.embeddings.create, model="minilm", input=t) for t in TEXTS]
        refused = pool.submit(post, server, "/v1/embeddings", {"model": "minilm", "input": long_text})
        status, body = refused.result()
        got = np.array([f.result().data[0].embedding for f in good])
    assert status == 400 and "reads at most 40" in body["error"]["message"] and "truncate" in body["error"]["message"]
    np.testing.assert_allclose(got, reference(bert, TEXTS), atol=1e-4)
    _, cut = post(server, "/embed", {"model": "minilm", "inputs": long_text, "truncate": True})
    np.testing.assert_allclose(cut, reference(bert, [long_text], max_length=ST_MAX_LENGTH), atol=1e-4)
    for body, words in (
        ({"model": "minilm", "input": []}, "at least one"),
        ({"model": "minilm", "input": "x", "dimensions": 33}, "dimensions"),
        ({"model": "minilm", "input": [[1, 99999]]}, "vocabulary"),
    ):
        status, error = post(server, "/v1/embeddings", body)
        assert status == 400 and words in error["error"]["message"], error


def test_the_models_list_shows_embedders(oai):
    assert {"bert", "minilm", "bert_cls"} <= {m.id for m in oai.models.list().data}
