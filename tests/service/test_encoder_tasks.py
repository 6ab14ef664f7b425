"""Classifiers, rerankers, token classifiers and image classifiers as products, through a real
server and real clients: BERTs and a ViT built from configs after a fixed seed, exported by
`optimum-cli` (text-classification with 3 labels and with 1, token-classification,
image-classification) and dropped into the repository as Optimum wrote them, with no config.
Every answer is compared with transformers' own logits, scored as TEI scores them (softmax over
labels, the sigmoid for one label); text as BYTES tensors through tritonclient, images with curl."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from service.launcher import ServerProcess
from tests.service.conftest import optimum_export, post, wordpiece

TEXTS = [
    "def forward(self, x):",
    "import torch",
    "return self.proj(y) + x",
    "class Config: pass",
    "a much longer line of source text that keeps going with words and words and words",
]
SENTIMENT = {0: "negative", 1: "neutral", 2: "positive"}
NER = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
VISION = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}
IMAGE_SIZE = 32


def bert_config(tok, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (the transformers model, its Optimum export folder); and the tokenizer and the image processor."""
    from transformers import (
        BertForSequenceClassification,
        BertForTokenClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    root = tmp_path_factory.mktemp("encoder_tasks")
    tok, fast = wordpiece()
    built = {}
    torch.manual_seed(0)
    for name, model, task in (
        (
            "sentiment",
            BertForSequenceClassification(bert_config(tok, num_labels=3, id2label=SENTIMENT)),
            "text-classification",
        ),
        ("reranker", BertForSequenceClassification(bert_config(tok, num_labels=1)), "text-classification"),
        ("ner", BertForTokenClassification(bert_config(tok, num_labels=5, id2label=NER)), "token-classification"),
    ):
        model.eval().save_pretrained(root / name)
        fast.save_pretrained(root / name)
        built[name] = (model, optimum_export(root / name, task, root / f"{name}_onnx"))
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=IMAGE_SIZE,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=4,
            id2label=VISION,
        )
    ).eval()
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    vit.save_pretrained(root / "vit")
    processor.save_pretrained(root / "vit")
    built["vit"] = (vit, optimum_export(root / "vit", "image-classification", root / "vit_onnx"))
    return built, fast, processor


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    built, _, _ = models
    repo = tmp_path_factory.mktemp("tasks_repo")
    for name, (_, folder) in built.items():
        shutil.copytree(folder, repo / name / "1")
    # the ViT again with a config.json that gives no image shape: its warm-up input cannot be derived
    shutil.copytree(built["vit"][1], repo / "vit_bare" / "1")
    config = json.loads((repo / "vit_bare" / "1" / "config.json").read_text())
    del config["image_size"], config["num_channels"]
    (repo / "vit_bare" / "1" / "config.json").write_text(json.dumps(config))
    with ServerProcess(repo) as s:
        yield s


def logits_of(models, name: str, *texts) -> np.ndarray:
    built, fast, _ = models
    with torch.no_grad():
        return built[name][0](**fast(*texts, return_tensors="pt")).logits[0].numpy().astype(np.float64)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_predict_scores_every_label_as_tei(server, models):
    """/predict: one text, a pair (premise, hypothesis), a batch of texts: softmax of
    transformers' logits within 1e-4, every id2label label, best first; raw_scores the logits."""
    status, one = post(server, "/predict", {"model": "sentiment", "inputs": TEXTS[0]})
    assert status == 200
    want = softmax(logits_of(models, "sentiment", TEXTS[0]))
    assert [p["label"] for p in one] == [SENTIMENT[i] for i in np.argsort(-want)]
    np.testing.assert_allclose([p["score"] for p in one], np.sort(want)[::-1], atol=1e-4)
    _, pair = post(server, "/predict", {"model": "sentiment", "inputs": [TEXTS[0], TEXTS[1]]})
    got = {p["label"]: p["score"] for p in pair}
    want = softmax(logits_of(models, "sentiment", TEXTS[0], TEXTS[1]))
    np.testing.assert_allclose([got[SENTIMENT[i]] for i in range(3)], want, atol=1e-4)
    _, batch = post(server, "/predict", {"model": "sentiment", "inputs": [[t] for t in TEXTS]})
    assert len(batch) == len(TEXTS)
    for text, answer in zip(TEXTS, batch):
        got = {p["label"]: p["score"] for p in answer}
        np.testing.assert_allclose(
            [got[SENTIMENT[i]] for i in range(3)], softmax(logits_of(models, "sentiment", text)), atol=1e-4
        )
    _, raw = post(server, "/predict", {"model": "sentiment", "inputs": TEXTS[2], "raw_scores": True})
    got = {p["label"]: p["score"] for p in raw}
    np.testing.assert_allclose(
        [got[SENTIMENT[i]] for i in range(3)], logits_of(models, "sentiment", TEXTS[2]), atol=1e-4
    )


def test_rerank_sorts_pairs_by_sigmoid_and_refuses_without_texts(server, models):
    """/rerank: (query, text) pairs through the one-label cross-encoder, the sigmoid of
    transformers' logit, sorted best first with each text's index; return_text; raw_scores.
    A call without texts is 400 naming them while concurrent calls keep their scores."""
    query = "what does forward return"
    want = np.array([sigmoid(logits_of(models, "reranker", query, t)[0]) for t in TEXTS])
    with ThreadPoolExecutor(4) as pool:
        good = [
            pool.submit(post, server, "/rerank", {"model": "reranker", "query": query, "texts": TEXTS})
            for _ in range(3)
        ]
        bad = pool.submit(post, server, "/rerank", {"model": "reranker", "query": query, "texts": []})
        status, error = bad.result()
        answers = [f.result() for f in good]
    assert status == 400 and "texts" in error["error"], error
    for status, ranked in answers:
        assert status == 200
        assert [r["index"] for r in ranked] == list(np.argsort(-want, kind="stable"))
        np.testing.assert_allclose([r["score"] for r in ranked], np.sort(want)[::-1], atol=1e-4)
    _, with_text = post(
        server,
        "/rerank",
        {"model": "reranker", "query": query, "texts": TEXTS, "return_text": True, "raw_scores": True},
    )
    for r in with_text:
        assert r["text"] == TEXTS[r["index"]]
        np.testing.assert_allclose(r["score"], logits_of(models, "reranker", query, TEXTS[r["index"]])[0], atol=1e-4)
    status, error = post(server, "/rerank", {"model": "sentiment", "query": query, "texts": TEXTS})
    assert status == 400 and "reranker" in error["error"]


def test_token_classifier_labels_each_token_as_the_pipeline(server, models):
    """/predict on a token classifier: every token whose best label is not O (special tokens
    left out), with its score, word and character offsets, as transformers' pipeline answers."""
    built, fast, _ = models
    status, answers = post(server, "/predict", {"model": "ner", "inputs": [[t] for t in TEXTS[:3]]})
    assert status == 200 and len(answers) == 3 and sum(map(len, answers)) > 0
    for text, entities in zip(TEXTS, answers):
        enc = fast(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        scores = softmax(logits_of(models, "ner", text))
        want = [
            (i, NER[int(s.argmax())], float(s.max()), tuple(enc["offset_mapping"][i]))
            for i, s in enumerate(scores)
            if not enc["special_tokens_mask"][i] and NER[int(s.argmax())] != "O"
        ]
        assert [(e["index"], e["entity"]) for e in entities] == [(i, label) for i, label, _, _ in want]
        np.testing.assert_allclose([e["score"] for e in entities], [s for _, _, s, _ in want], atol=1e-4)
        assert [(e["start"], e["end"]) for e in entities] == [o for _, _, _, o in want]
        assert all(text[e["start"] : e["end"]].lower() == e["word"].removeprefix("##") for e in entities)


def png(seed: int, size=(40, 28)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def vit_scores(models, image: bytes) -> np.ndarray:
    from PIL import Image

    built, _, processor = models
    pixels = processor(images=Image.open(io.BytesIO(image)), return_tensors="pt").pixel_values
    with torch.no_grad():
        return softmax(built["vit"][0](pixel_values=pixels).logits[0].numpy().astype(np.float64))


def test_images_are_classified_with_curl_and_a_bad_one_harms_no_one(server, models, tmp_path):
    """The ViT export loads (its warm-up shape from config.json) and answers base64 PNGs sent
    with curl as transformers' processor and model do; an undecodable image is 400 naming it
    while the images sent beside it keep their labels."""
    images = [png(i) for i in range(4)]
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"model": "vit", "inputs": [base64.b64encode(b).decode() for b in images]}))
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{body}",
            server.http_url + "/predict",
        ],
        capture_output=True,
        check=True,
    )
    answers = json.loads(out.stdout)
    for image, answer in zip(images, answers):
        got = {p["label"]: p["score"] for p in answer}
        np.testing.assert_allclose([got[VISION[i]] for i in range(4)], vit_scores(models, image), atol=1e-4)
    with ThreadPoolExecutor(4) as pool:
        good = [
            pool.submit(post, server, "/predict", {"model": "vit", "inputs": base64.b64encode(b).decode()})
            for b in images
        ]
        bad = pool.submit(post, server, "/predict", {"model": "vit", "inputs": base64.b64encode(b"not a png").decode()})
        status, error = bad.result()
        answers = [f.result()[1] for f in good]
    assert status == 400 and "inputs[0]" in error["error"] and "image" in error["error"], error
    for image, answer in zip(images, answers):
        got = {p["label"]: p["score"] for p in answer}
        np.testing.assert_allclose([got[VISION[i]] for i in range(4)], vit_scores(models, image), atol=1e-4)


def test_a_vision_model_loads_whether_or_not_its_shape_can_be_derived(server, models):
    """The ViT's symbolic [C, H, W] is taken from config.json (warmed up, shape in its metadata);
    the copy whose config.json gives no shape loads READY all the same, its warm-up skipped and
    counted, and classifies as the first does."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("vit_bare")
        meta = client.get_model_metadata("vit")
        assert list(meta.inputs[0].shape) == [-1, 3, IMAGE_SIZE, IMAGE_SIZE]
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'tserve_warmup_skipped_total{model="vit_bare",version="1"} 1.0' in text
    assert 'tserve_warmup_skipped_total{model="vit",' not in text
    image = png(7)
    _, answer = post(server, "/predict", {"model": "vit_bare", "inputs": base64.b64encode(image).decode()})
    got = {p["label"]: p["score"] for p in answer}
    np.testing.assert_allclose([got[VISION[i]] for i in range(4)], vit_scores(models, image), atol=1e-4)
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    assert (
        'tserve_requests_total{api="image_classify",model="vit_bare",outcome="success",protocol="http",reason="none",'
        'version="1"} 1.0' in text
    )


def test_tritonclient_sends_text_and_images_as_bytes(server, models):
    """KServe v2 BYTES tensors over gRPC and HTTP (Triton's string encoding): text in, scores
    and labels out; images as their encoded bytes; raw pixel_values still served as a tensor."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    texts = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    want = np.array([softmax(logits_of(models, "sentiment", t)) for t in TEXTS])
    with grpcclient.InferenceServerClient(server.address) as client:
        text = grpcclient.InferInput("text", [len(TEXTS)], "BYTES")
        text.set_data_from_numpy(texts)
        res = client.infer("sentiment", [text])
        np.testing.assert_allclose(res.as_numpy("scores"), want, atol=1e-4)
        assert [b.decode() for b in res.as_numpy("label")] == [SENTIMENT[int(i)] for i in want.argmax(1)]
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://")) as client:
        text = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
        text.set_data_from_numpy(texts, binary_data=False)
        res = client.infer("sentiment", [text])
        np.testing.assert_allclose(res.as_numpy("scores"), want, atol=1e-4)
        images = [png(i) for i in range(3)]
        image = httpclient.InferInput("image", [3], "BYTES")
        image.set_data_from_numpy(np.array(images, dtype=np.object_))
        res = client.infer("vit", [image])
        np.testing.assert_allclose(res.as_numpy("scores"), [vit_scores(models, b) for b in images], atol=1e-4)
        pixels = httpclient.InferInput("pixel_values", [1, 3, IMAGE_SIZE, IMAGE_SIZE], "FP32")
        pixels.set_data_from_numpy(np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
        assert client.infer("vit", [pixels]).as_numpy("logits").shape == (1, 4)
