"""The dynamic batcher, in-process, on a real (tiny) ONNX model: every caller gets exactly its
own rows, bad requests fail alone, and the queue bound, deadlines and cancellation hold."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from service.batcher import DynamicBatcher
from service.errors import DeadlineExceeded, QueueFull, TServeError
from service.metrics import Metrics, ModelObserver
from service.runtime import OrtRuntime
from service.types import BatchingPolicy, InferRequest, ModelSpec, PaddingRules, TensorSpec
from service.validation import prepare

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

VOCAB = 50
TABLE = np.stack([np.arange(VOCAB), -np.arange(VOCAB) * 10], axis=1).astype(np.float32)  # id -> (id, -10 id)


def lookup_model(path: Path) -> Path:
    """input_ids [B, T] -> y [B, T, 2] = TABLE[input_ids]: a row given to the wrong caller shows."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 2])],
        [numpy_helper.from_array(TABLE, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    rt = OrtRuntime(lookup_model(tmp_path_factory.mktemp("lookup") / "model.onnx"), ["CPUExecutionProvider"])
    yield rt
    rt.close()


def spec(max_queue: int = 1024) -> ModelSpec:
    return ModelSpec(
        name="lookup",
        version=1,
        platform="onnxruntime_onnx",
        model_path=Path("model.onnx"),
        inputs=(TensorSpec("input_ids", "INT64", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1, 2)),),
        max_batch_size=8,
        batching=BatchingPolicy(enabled=True, max_batch_size=8, max_queue_delay_s=0.002, max_queue_size=max_queue),
        padding=PaddingRules(pad_values={"input_ids": 0}, unpad_outputs=("y",)),
    )


async def with_batcher(runtime, body, max_queue: int = 1024):
    s = spec(max_queue)
    observer = ModelObserver(Metrics(CollectorRegistry()), s.name, s.version)
    batcher = DynamicBatcher(s, runtime, observer)
    batcher.start()
    try:
        return await body(s, batcher, observer)
    finally:
        await batcher.close()


def submit(s: ModelSpec, batcher: DynamicBatcher, ids: np.ndarray, deadline: float | None = None):
    return batcher.submit(prepare(s, InferRequest("lookup", "", "", {"input_ids": ids}, ())), deadline)


def test_every_caller_gets_exactly_its_rows(runtime):
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, VOCAB, (rng.integers(1, 4), rng.integers(1, 13))) for _ in range(200)]

    async def body(s, batcher, observer):
        results = await asyncio.gather(*(submit(s, batcher, ids) for ids in requests))
        for ids, (outputs, _timing) in zip(requests, results):
            np.testing.assert_array_equal(outputs["y"], TABLE[ids])
        return observer.stats

    stats = asyncio.run(with_batcher(runtime, body))
    assert stats.inference_count == sum(len(ids) for ids in requests)
    # all 200 were queued before the scheduler first ran, so batches were formed
    assert stats.execution_count < len(requests) and max(stats.by_batch_size) > 1


def test_a_request_that_fails_in_a_batch_fails_alone(runtime):
    rng = np.random.default_rng(1)
    good = [rng.integers(0, VOCAB, (1, 6)) for _ in range(7)]
    bad = np.array([[1, 2, VOCAB + 1000, 3, 4, 5]])  # ONNX Runtime's Gather refuses it

    async def body(s, batcher, _observer):
        return await asyncio.gather(
            *(submit(s, batcher, ids) for ids in [*good[:3], bad, *good[3:]]), return_exceptions=True
        )

    results = asyncio.run(with_batcher(runtime, body))
    assert isinstance(results[3], TServeError), results[3]
    for ids, result in zip(good, results[:3] + results[4:]):
        np.testing.assert_array_equal(result[0]["y"], TABLE[ids])


def test_queue_bound_refuses_at_once(runtime):
    async def body(s, batcher, _observer):
        return await asyncio.gather(
            *(submit(s, batcher, np.ones((1, 3), np.int64)) for _ in range(10)), return_exceptions=True
        )

    results = asyncio.run(with_batcher(runtime, body, max_queue=4))
    refused = [r for r in results if isinstance(r, QueueFull)]
    assert len(refused) == 6 and "max_queue_size 4" in refused[0].message
    assert all(not isinstance(r, Exception) for r in results[:4])


def test_a_request_past_its_deadline_is_dropped_before_compute(runtime):
    async def body(s, batcher, observer):
        with pytest.raises(DeadlineExceeded):
            await submit(s, batcher, np.ones((1, 3), np.int64), deadline=time.monotonic() - 1)
        return observer.stats

    assert asyncio.run(with_batcher(runtime, body)).execution_count == 0


def test_a_cancelled_caller_frees_its_place(runtime):
    async def body(s, batcher, _observer):
        task = asyncio.ensure_future(submit(s, batcher, np.ones((1, 3), np.int64)))
        await asyncio.sleep(0)  # queued, not yet run
        assert batcher.queued == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert batcher.queued == 0
        outputs, _ = await submit(s, batcher, np.full((1, 2), 7, np.int64))  # and the batcher carries on
        np.testing.assert_array_equal(outputs["y"], TABLE[[[7, 7]]])

    asyncio.run(with_batcher(runtime, body))


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(runtime):
    """Predicted wait = the queued work on the cost line (here 10 ms a token, from its seeds):
    a request whose deadline comes sooner is refused at admission, one with time enough queues."""

    async def body():
        s = spec()
        observer = ModelObserver(Metrics(CollectorRegistry()), s.name, s.version)
        batcher = DynamicBatcher(s, runtime, observer, cost_seeds=[(10.0, 0.1), (100.0, 1.0)])  # not started
        waiting = asyncio.ensure_future(submit(s, batcher, np.ones((1, 20), np.int64)))  # 20 tokens: 0.2 s
        await asyncio.sleep(0)
        assert batcher.predicted_wait_s() == pytest.approx(0.2, rel=0.05)
        started = time.perf_counter()
        with pytest.raises(QueueFull, match="predicted queue wait 200 ms"):
            await submit(s, batcher, np.ones((1, 3), np.int64), deadline=time.monotonic() + 0.05)
        assert time.perf_counter() - started < 0.01  # refused at once, not after the deadline
        late = asyncio.ensure_future(submit(s, batcher, np.ones((1, 3), np.int64), deadline=time.monotonic() + 5))
        await asyncio.sleep(0)
        assert batcher.queued == 2
        refusals = observer.metrics.refusals.labels(s.name, str(s.version), "deadline")._value.get()
        await batcher.close()
        await asyncio.gather(waiting, late, return_exceptions=True)
        return refusals

    assert asyncio.run(body()) == 1
