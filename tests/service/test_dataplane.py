"""The data plane, in-process on the shipped bytegpt: both request kinds take the same road,
so the in-flight count, drain and outcome records cover a generation stream as they cover
inference."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.dataplane import DataPlane
from service.errors import InvalidInput, ModelNotFound, Unavailable
from service.generation.requests import GenerateInput
from service.generation.sequence import FinishReason
from service.metrics import Metrics
from service.models import ModelManager
from service.settings import Settings
from service.types import InferRequest
from tests.conftest import BYTEGPT_VOCAB, DEFAULT_REPOSITORY

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

LOOP = asyncio.new_event_loop()


@pytest.fixture
def dataplane():
    registry = CollectorRegistry()

    async def start():
        manager = ModelManager(Settings(model_repository=DEFAULT_REPOSITORY), Metrics(registry))
        await manager.load("bytegpt")
        dp = DataPlane(manager, manager.settings)
        dp.loading_done = True
        return dp

    dp = LOOP.run_until_complete(start())
    dp.registry = registry
    yield dp
    LOOP.run_until_complete(dp.manager.close())


def value(dp, name: str, **labels) -> float:
    return dp.registry.get_sample_value(name, {"model": "bytegpt", "version": "1", "protocol": "grpc", **labels}) or 0.0


def generate_input(n: int = 20, **kw) -> GenerateInput:
    fields = dict(
        model="bytegpt",
        text="def f(x):",
        token_ids=None,
        max_new_tokens=n,
        temperature=None,
        top_k=None,
        top_p=None,
        seed=None,
        stop=[],
        request_id="g1",
    )
    return GenerateInput(**{**fields, **kw})


def test_a_generation_stream_is_in_flight_until_its_last_message_and_survives_drain(dataplane):
    dp = dataplane

    async def body():
        async with aclosing(dp.generate(generate_input(30))) as stream:
            first = await anext(stream)
            assert first[-1].finish_reason is None
            assert dp.inflight == 1 and value(dp, "tserve_inflight_requests", api="generate") == 1
            dp.draining = True  # what SIGTERM does; then, after the intake window:
            assert not dp.ready()
            dp.refusing = True
            with pytest.raises(Unavailable):
                await anext(dp.generate(generate_input()))
            with pytest.raises(Unavailable):
                await dp.infer(InferRequest("bytegpt", "", "i1", {"input_ids": np.ones((1, 3), np.int64)}, ()))
            rest = [event async for chunk in stream for event in chunk]
        return first + rest

    events = LOOP.run_until_complete(body())
    assert events[-1].finish_reason == FinishReason.LENGTH and sum(len(e.token_ids) for e in events) == 30
    assert dp.inflight == 0 and value(dp, "tserve_inflight_requests", api="generate") == 0
    assert value(dp, "tserve_requests_total", api="generate", outcome="success", reason="none") == 1
    assert value(dp, "tserve_requests_total", api="infer", outcome="success", reason="none") == 0


def test_a_reader_that_goes_away_cancels_its_sequence(dataplane):
    dp = dataplane
    engine = dp.manager.get("bytegpt").engine

    async def body():
        async with aclosing(dp.generate(generate_input(200))) as stream:
            await anext(stream)
        for _ in range(100):  # the engine frees the slot within a step
            if engine.active == 0:
                break
            await asyncio.sleep(0.01)
        return engine.active

    assert LOOP.run_until_complete(body()) == 0
    assert dp.inflight == 0
    assert value(dp, "tserve_requests_total", api="generate", outcome="failure", reason="cancelled") == 1


def test_both_request_kinds_are_counted_in_one_place(dataplane):
    dp = dataplane
    ids = np.frombuffer(b"import os", np.uint8).astype(np.int64)[None]

    async def body():
        response = await dp.infer(InferRequest("bytegpt", "", "i1", {"input_ids": ids}, ("logits",)))
        with pytest.raises(InvalidInput):
            await dp.infer(InferRequest("bytegpt", "", "i2", {"input_ids": ids + BYTEGPT_VOCAB}, ()))
        with pytest.raises(InvalidInput):
            await anext(dp.generate(generate_input(token_ids=[1, 99999], text=None)))
        with pytest.raises(ModelNotFound):
            await anext(dp.generate(generate_input(model="nope")))
        return response

    response = LOOP.run_until_complete(body())
    assert response.outputs["logits"].shape == (1, 9, BYTEGPT_VOCAB)
    assert value(dp, "tserve_requests_total", api="infer", outcome="success", reason="none") == 1
    assert value(dp, "tserve_requests_total", api="infer", outcome="failure", reason="invalid_argument") == 1
    assert value(dp, "tserve_requests_total", api="generate", outcome="failure", reason="invalid_argument") == 1
    assert dp.inflight == 0
