"""A task's inputs in the batcher, in-process: classifier heads (one value per row) batch
texts of different lengths, a request's inputs queue together or not at all, and the limits a
folder implies (positions, classification heads) are read as the models need them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from service.batcher import DynamicBatcher
from service.conventions import encoder
from service.errors import InvalidInput, QueueFull
from service.metrics import Metrics, ModelObserver
from service.repository import read_export_metadata
from service.runtime import OrtRuntime
from service.types import BatchingPolicy, InferRequest, ModelSpec, PaddingRules, TensorSpec
from service.validation import prepare

pytestmark = pytest.mark.unit

TABLE = np.arange(20, dtype=np.float32)[:, None].repeat(2, 1)  # id -> (id, id); the pad id 0 adds nothing


def pooled_model(path: Path) -> Path:
    """input_ids [B, T] -> scores [B, 2] = sum over T of TABLE[ids]: one value per row, as a classifier's logits."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["g"], axis=0),
            helper.make_node("ReduceSum", ["g", "axes"], ["scores"], keepdims=0),
        ],
        "pooled",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def spec(max_queue: int = 64) -> ModelSpec:
    return ModelSpec(
        name="pooled",
        version=1,
        platform="onnxruntime_onnx",
        model_path=Path("model.onnx"),
        inputs=(TensorSpec("input_ids", "INT64", (-1,)),),
        outputs=(TensorSpec("scores", "FP32", (2,)),),
        max_batch_size=32,
        batching=BatchingPolicy(enabled=True, max_batch_size=32, max_queue_size=max_queue, max_batch_tokens=4096),
        padding=PaddingRules(pad_values={"input_ids": 0}, unpad_outputs=()),
    )


def prepared(s: ModelSpec, ids: list[int]):
    return prepare(s, InferRequest("pooled", "", "", {"input_ids": np.array([ids], np.int64)}, ()))


def test_rows_of_a_per_row_output_pad_to_share_a_batch():
    s = spec()
    short, long = prepared(s, [1, 2, 3]), prepared(s, [4, 5, 6, 7, 8, 9, 10])
    assert short.length == 3 and long.length == 7 and short.group == long.group


def test_a_requests_inputs_queue_together_and_get_their_own_results(tmp_path):
    runtime = OrtRuntime(pooled_model(tmp_path / "model.onnx"), ["CPUExecutionProvider"])

    async def main():
        s = spec(max_queue=8)
        batcher = DynamicBatcher(s, runtime, ModelObserver(Metrics(CollectorRegistry()), s.name, s.version))
        batcher.start()
        try:
            rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [2, 2]]
            results = await batcher.submit_all([prepared(s, r) for r in rows], None)
            got = [out["scores"][0, 0] for out, _ in results]
            with pytest.raises(InvalidInput, match="queues at most 8"):
                await batcher.submit_all([prepared(s, [1])] * 9, None)
            return got
        finally:
            await batcher.close()

    async def full():
        s = spec(max_queue=8)
        batcher = DynamicBatcher(s, runtime, ModelObserver(Metrics(CollectorRegistry()), s.name, s.version))
        # not started: what is queued stays queued
        held = [asyncio.ensure_future(batcher.submit(prepared(s, [1]), None)) for _ in range(6)]
        await asyncio.sleep(0)
        assert batcher.queued == 6
        with pytest.raises(QueueFull, match="3 more inputs"):
            await batcher.submit_all([prepared(s, [1])] * 3, None)
        assert batcher.queued == 6  # none of the three took a place
        await batcher.close()
        await asyncio.gather(*held, return_exceptions=True)

    try:
        assert asyncio.run(main()) == [6.0, 49.0, 11.0, 4.0]
        asyncio.run(full())
    finally:
        runtime.close()


def write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data))


def test_the_folder_says_how_long_an_input_may_be_and_which_logits_are_a_head(tmp_path):
    write(tmp_path, "config.json", {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    assert read_export_metadata(tmp_path).max_positions == 512  # RoBERTa's table starts after the pad id
    write(tmp_path, "config.json", {"model_type": "bert", "max_position_embeddings": 512})
    write(tmp_path, "tokenizer_config.json", {"model_max_length": 256})
    assert read_export_metadata(tmp_path).max_positions == 256
    write(tmp_path, "config.json", {"architectures": ["BertForTokenClassification"]})
    assert read_export_metadata(tmp_path).head == "token"
    ids = ["input_ids", "attention_mask"]
    vocab_wide = {"logits": (-1, 250002)}  # a masked language model: not padded into 32-row batches
    assert encoder.padding_rules(ids, vocab_wide, 0, None) is None
    assert encoder.padding_rules(ids, {"logits": (-1, 5)}, 0, "token") == (
        {"input_ids": 0.0, "attention_mask": 0.0},
        ("logits",),
    )
    assert encoder.padding_rules(ids, {"logits": (3,)}, 0, "sequence")[1] == ()
