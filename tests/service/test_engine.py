"""The generation engine, in-process, on every cache it runs (real ONNX graphs): bytegpt's
weights as torch.onnx traces them (KVRows: numpy caches, left-padded rows), the shipped
bytegpt's fused GroupQueryAttention graph (KVSlots: a shared KV buffer) and the shipped
encoder-decoder namegen (Seq2SeqCache):
joins, holes, compaction, chunked prefill, cancel, deadlines and failure isolation. Tests of
one cache's own feature (drafts, a widening buffer) run on that cache."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.conventions.seq2seq import DECODER, DECODER_WITH_PAST, ENCODER
from service.errors import DeadlineExceeded, InvalidInput, TServeError
from service.generation.engine import EngineLimits, GenerationEngine
from service.generation.grammar import Constraint
from service.generation.requests import GenerateInput, to_sequence
from service.generation.kv_rows import KVRows
from service.generation.kv_slots import KVSlots, column_bytes
from service.generation.pacing import PrefillPacer
from service.generation.sampling import SamplingParams
from service.generation.seq2seq_cache import Seq2SeqCache
from service.generation.sequence import FinishReason, Sequence
from service.metrics import Metrics, ModelObserver
from service.models import ModelManager, decoder_cache, seq2seq_cache
from service.runtime import OrtRuntime
from service.settings import Settings
from tests.conftest import DEFAULT_REPOSITORY

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

TEXTS = (
    "def fibonacci(n):",
    "import os\n",
    "class Stack:\n    def push(self, x):",
    "for i in range(10):",
    "x",
    "return self._data[key]",
)
LENGTHS = [38, 7, 25, 3, 33, 12]  # within namegen's longest output (39)


LOOP = asyncio.new_event_loop()  # one loop for the module: the loaded models' tasks live on it


@dataclass(frozen=True)
class Model:
    """What an engine runs on: a cache built over the model's runtimes (each passed through
    `wrap` first: a test's fault injection), and the model's tokenizer."""

    name: str
    factory: Callable  # (*runtimes, limits) -> KVCache
    runtimes: tuple
    tokenizer: object

    def make_cache(self, wrap=lambda runtime: runtime):
        runtimes = [wrap(r) for r in self.runtimes]
        return lambda limits: self.factory(*runtimes, limits)

    @property
    def prompts(self) -> list[list[int]]:
        return [self.tokenizer.encode(t, False) for t in TEXTS]

    def text(self, tokens: list[int]) -> str:
        decoder = self.tokenizer.decoder()
        return "".join(decoder.push(t) for t in tokens) + decoder.flush()


@pytest.fixture(scope="module")
def manager():
    async def load():
        manager = ModelManager(Settings(model_repository=DEFAULT_REPOSITORY), Metrics(CollectorRegistry()))
        await manager.load("bytegpt")
        await manager.load("namegen")
        return manager

    manager = LOOP.run_until_complete(load())
    yield manager
    LOOP.run_until_complete(manager.close())


@pytest.fixture(scope="module")
def traced_runtime(traced_bytegpt):
    runtime = OrtRuntime(traced_bytegpt, ["CPUExecutionProvider"])
    yield runtime
    runtime.close()


def traced_model(manager, traced_runtime) -> Model:
    mv = manager.get("bytegpt")
    graph = dataclasses.replace(mv.spec.decoder, shared_kv=False)  # the same inputs and outputs, left-padded
    return Model(mv.name, partial(decoder_cache, graph), (traced_runtime,), mv.generation.tokenizer)


def fused_model(manager, traced_runtime=None) -> Model:
    mv = manager.get("bytegpt")
    graph, runtime = mv.make_cache.args  # the shipped graph, which reads row lengths from its mask
    assert graph.shared_kv and runtime is mv.graphs["model.onnx"]
    return Model(mv.name, partial(decoder_cache, graph), (runtime,), mv.generation.tokenizer)


def seq2seq_model(manager, traced_runtime=None) -> Model:
    mv = manager.get("namegen")
    return Model(
        mv.name,
        partial(seq2seq_cache, mv.spec),
        tuple(mv.graphs[f] for f in (ENCODER, DECODER, DECODER_WITH_PAST)),
        mv.generation.tokenizer,
    )


CACHES = {
    "KVRows": (traced_model, KVRows),
    "KVSlots": (fused_model, KVSlots),
    "Seq2SeqCache": (seq2seq_model, Seq2SeqCache),
}


@pytest.fixture(scope="module", params=list(CACHES))
def model(request, manager, traced_runtime) -> Model:
    """Every engine test runs on each cache."""
    build, kind = CACHES[request.param]
    m = build(manager, traced_runtime)
    assert isinstance(m.make_cache()(EngineLimits()), kind)
    return m


async def drain(seq: Sequence) -> list:
    """A sequence's events (and its siblings', n > 1: they share its queue) to the last finish."""
    events, running = [], len(seq.group)
    while running:
        events.append(await seq.events.get())
        running -= events[-1].finish_reason is not None
    return events


def run(
    m: Model,
    jobs: list[Sequence],
    limits: EngineLimits,
    steps: list | None = None,
    during=None,
    engines: list | None = None,
    wrap=lambda runtime: runtime,
) -> list[list]:
    """Submit every job at once; returns each job's events (and appends the closed engine to
    `engines`, for a look at its state)."""

    async def main():
        engine = GenerationEngine(
            m.name, m.make_cache(wrap), limits, on_step=steps.append if steps is not None else None
        )
        if engines is not None:
            engines.append(engine)
        engine.start()
        try:
            for seq in jobs:
                engine.submit(seq)
            if during is not None:
                await during(engine)
            return await asyncio.gather(*(drain(s) for s in jobs))
        finally:
            await engine.close()

    return LOOP.run_until_complete(main())


def greedy(prompt: list[int], n: int, **kw) -> Sequence:
    return Sequence("r", list(prompt), SamplingParams(), n, **kw)


def tokens(events: list) -> list[int]:
    return [t for e in events for t in e.token_ids]


@pytest.fixture(scope="module")
def alone(model) -> list[list[int]]:
    """Each prompt generated on its own: the reference for every batched run."""
    return [
        tokens(run(model, [greedy(p, n)], EngineLimits(max_sequences=1))[0]) for p, n in zip(model.prompts, LENGTHS)
    ]


def test_a_busy_batch_gives_each_sequence_its_tokens_alone(model, alone):
    """Three slots for six sequences of mixed lengths and a small token budget: prompts are run
    in chunks, finished rows become holes that joiners fill, and the batch never grows past the
    slots."""
    steps = []
    results = run(
        model,
        [greedy(p, n) for p, n in zip(model.prompts, LENGTHS)],
        EngineLimits(max_sequences=3, token_budget=8),
        steps,
    )
    assert [tokens(r) for r in results] == alone
    assert all(r[-1].finish_reason == FinishReason.LENGTH for r in results)
    assert [r[-1].generated_tokens for r in results] == LENGTHS
    assert max(s.decode_rows for s in steps) <= 3  # joiners took holes instead of adding rows
    assert sum(s.prefill_tokens for s in steps) == sum(map(len, model.prompts))
    assert sum(s.tokens for s in steps) == sum(LENGTHS)
    assert steps[-1].active == 0 and steps[-1].kv_cache_bytes == 0


def test_n_choices_prefill_once_and_each_samples_as_its_own_seed(model, manager, alone):
    """A request for 3 sampled choices (seed 7), beside two greedy sequences: the prompt is
    prefilled once, and choice i draws exactly what a request for one choice with seed 7 + i
    draws alone; the greedy neighbours keep their tokens."""
    config = manager.get(model.name).generation
    prompt = model.prompts[2]

    def request(n: int, seed: int) -> Sequence:
        return to_sequence(
            config,
            GenerateInput(
                model=model.name,
                text=None,
                token_ids=prompt,
                max_new_tokens=20,
                temperature=0.9,
                top_k=None,
                top_p=None,
                seed=seed,
                stop=[],
                request_id="n",
                ignore_eos=True,
                n=n,
            ),
            64,
            None,
        )

    singles = [tokens(run(model, [request(1, 7 + i)], EngineLimits(max_sequences=1))[0]) for i in range(3)]
    steps = []
    group = request(3, 7)
    neighbours = [greedy(p, n) for p, n in zip(model.prompts[:2], LENGTHS[:2])]
    results = run(model, [neighbours[0], group, neighbours[1]], EngineLimits(max_sequences=5, token_budget=16), steps)
    choices = [tokens([e for e in results[1] if e.index == i]) for i in range(3)]
    assert choices == singles and len({tuple(c) for c in choices}) == 3
    assert [tokens(results[0]), tokens(results[2])] == alone[:2]
    assert sum(s.prefill_tokens for s in steps) == len(prompt) + len(model.prompts[0]) + len(model.prompts[1])
    assert steps[-1].active == 0 and steps[-1].kv_cache_bytes == 0


def test_static_batching_gives_the_same_tokens(model, alone):
    """A small token budget: a batch starts decoding while later members still prefill, and
    ends while they do; the next batch's members must not take their slots."""
    results = run(
        model,
        [greedy(p, n) for p, n in zip(model.prompts, LENGTHS)],
        EngineLimits(max_sequences=4, token_budget=8, scheduling="static"),
    )
    assert [tokens(r) for r in results] == alone


def test_static_batching_keeps_a_prefilling_sequence_whole(model):
    """Two one-token prompts join and end while a long prompt is still being prefilled in
    chunks; the batch is cleared and two newcomers are admitted beside it. Every sequence still
    gets its tokens alone (the newcomers must not take the long prompt's cache slot)."""
    long = model.tokenizer.encode(
        "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"
        "    def pop(self):\n        return self.items.pop()\n"
    )
    jobs = [(model.prompts[4], 2), (model.prompts[4], 2), (long, 5), (model.prompts[0], 6), (model.prompts[1], 6)]
    assert len(long) > 16 and len(model.prompts[4]) == 1
    want = [tokens(run(model, [greedy(p, n)], EngineLimits(max_sequences=1))[0]) for p, n in jobs]
    got = run(
        model, [greedy(p, n) for p, n in jobs], EngineLimits(max_sequences=3, token_budget=8, scheduling="static")
    )
    assert [tokens(r) for r in got] == want


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    def sampled() -> Sequence:
        return Sequence("s", list(model.prompts[0]), SamplingParams(temperature=0.9, top_k=40, seed=11), 30)

    by_itself = tokens(run(model, [sampled()], EngineLimits())[0])
    crowd = [greedy(p, n) for p, n in zip(model.prompts, LENGTHS)]
    in_a_crowd = run(model, [*crowd[:3], sampled(), *crowd[3:]], EngineLimits(max_sequences=4))[3]
    assert tokens(in_a_crowd) == by_itself


def test_cancel_frees_the_slot_and_leaves_the_others_alone(model, alone):
    long = greedy(model.prompts[1], 200)
    others = [greedy(p, n) for p, n in zip(model.prompts[:3], LENGTHS[:3])]

    async def cancel_after_first_token(engine):
        first = await long.events.get()
        assert first.finish_reason is None
        engine.cancel(long)
        long.events.put_nowait(first)  # keep the stream whole for drain()

    results = run(model, [long, *others], EngineLimits(max_sequences=2), during=cancel_after_first_token)
    assert results[0][-1].finish_reason == FinishReason.CANCELLED and len(tokens(results[0])) < 200
    assert [tokens(r) for r in results[1:]] == alone[:3]


def test_a_sequence_past_its_deadline_is_ended(model):
    late = greedy(model.prompts[0], 50, deadline=time.monotonic() - 1)
    events = run(model, [late], EngineLimits())[0]
    assert events[-1].finish_reason == FinishReason.DEADLINE and events[-1].generated_tokens == 0
    assert isinstance(events[-1].error, DeadlineExceeded)


def test_a_failing_prompt_ends_only_its_own_sequence(model, alone):
    """A token id the embedding does not have (the data plane refuses it; here it reaches ONNX
    Runtime) fails that sequence's prompt run; the rest generate as if it never came."""
    bad = greedy([1, 2, 70000, 3], 10)
    good = [greedy(p, n) for p, n in zip(model.prompts, LENGTHS)]
    results = run(model, [*good[:2], bad, *good[2:]], EngineLimits(max_sequences=4))
    failed = results[2][-1]
    assert failed.finish_reason == FinishReason.ERROR and failed.error is not None
    assert [tokens(r) for r in results[:2] + results[3:]] == alone


def test_eos_and_stop_end_a_sequence(model, alone):
    reference = alone[5]  # the greedy continuation of "return self._data[key]"
    k = next(i for i in range(1, len(reference)) if reference[i] not in reference[:i])
    eos = greedy(model.prompts[5], 12, eos_token_ids=frozenset({reference[k]}))
    events = run(model, [eos], EngineLimits())[0]
    assert events[-1].finish_reason == FinishReason.EOS and tokens(events) == reference[: k + 1]

    text = model.text(reference)
    stop = text[3:6]
    stopped = greedy(model.prompts[5], 12, stop=(stop,), decoder=model.tokenizer.decoder())
    events = run(model, [stopped], EngineLimits())[0]
    assert events[-1].finish_reason == FinishReason.STOP
    assert "".join(e.text for e in events) == text[: text.index(stop)]


class PoisonedRuntime:
    """A model's real runtime, except that any run whose input_ids hold `poison` fails as ONNX
    Runtime would fail on a bad input: a fault to find inside a batched decode."""

    def __init__(self, runtime, poison: int) -> None:
        self.runtime, self.poison = runtime, poison

    def run_sync(self, feeds, outputs):
        self._check(feeds["input_ids"])
        return self.runtime.run_sync(feeds, outputs)

    def io_binding(self):  # the fused graph's road: remember the input_ids bound
        return PoisonedBinding(self.runtime.io_binding())

    def run_binding(self, binding):
        self._check(binding.input_ids)
        self.runtime.run_binding(binding.binding)

    def _check(self, input_ids) -> None:
        if (input_ids == self.poison).any():
            raise InvalidInput(f"token {self.poison} is poisoned")


class PoisonedBinding:
    """An IO binding that remembers the input_ids and attention_mask bound."""

    def __init__(self, binding) -> None:
        self.binding, self.input_ids, self.attention_mask = binding, None, None

    def bind_cpu_input(self, name, value) -> None:
        if name in ("input_ids", "attention_mask"):
            setattr(self, name, value)
        self.binding.bind_cpu_input(name, value)

    def __getattr__(self, name):
        return getattr(self.binding, name)


def test_a_failing_decode_row_is_found_and_ends_alone(model, alone):
    """The batched decode fails; the engine re-runs the rows apart, ends only the culprit with
    the error, and every other sequence goes on with exactly its tokens alone."""
    culprit, k, poison = next(
        (i, k, t)
        for i, ref in enumerate(alone)
        for k, t in enumerate(ref[:-1])
        if k >= 1
        and t not in ref[:k]
        and all(t not in other_prompt for other_prompt in model.prompts)
        and all(t not in other for j, other in enumerate(alone) if j != i)
    )

    async def main():
        engine = GenerationEngine(
            model.name, model.make_cache(lambda r: PoisonedRuntime(r, poison)), EngineLimits(max_sequences=8)
        )
        engine.start()
        try:
            seqs = [greedy(p, n) for p, n in zip(model.prompts, LENGTHS)]
            for seq in seqs:
                engine.submit(seq)
            return await asyncio.gather(*(drain(s) for s in seqs))
        finally:
            await engine.close()

    results = LOOP.run_until_complete(main())
    failed = results[culprit][-1]
    assert failed.finish_reason == FinishReason.ERROR and "poisoned" in failed.error.message
    assert tokens(results[culprit]) == alone[culprit][: k + 1]  # it got every token up to the poisoned one
    assert [tokens(r) for i, r in enumerate(results) if i != culprit] == [
        a for i, a in enumerate(alone) if i != culprit
    ]


def test_a_step_that_fails_while_joining_leaves_no_sequence_unanswered(model):
    """An unexpected failure in the middle of the update (here the cache merge of the second
    joiner) must end every sequence the step held, never leave one waiting for ever."""

    async def main():
        engine = GenerationEngine(model.name, model.make_cache(), EngineLimits(max_sequences=8))
        join, calls = engine.rows.join, []

        def failing_join(seq, token):
            calls.append(seq)
            if len(calls) == 2:
                raise MemoryError("simulated: the merged cache does not fit")
            return join(seq, token)

        engine.rows.join = failing_join
        engine.start()
        try:
            seqs = [greedy(p, 30) for p in model.prompts[:3]]
            for seq in seqs:
                engine.submit(seq)
            return await asyncio.wait_for(asyncio.gather(*(drain(s) for s in seqs)), timeout=30)
        finally:
            await engine.close()

    results = LOOP.run_until_complete(main())
    ends = [r[-1] for r in results]
    assert all(e.finish_reason is not None for e in ends)  # every one answered
    assert any(e.finish_reason == FinishReason.ERROR and "generation step failed" in e.error.message for e in ends)


def test_a_cache_that_cannot_even_be_cleared_is_replaced_and_the_engine_serves_on(model, alone):
    """A failed step whose cache then fails to clear (a fault inside its own bookkeeping): every
    sequence the step held is answered, and the next request gets its tokens alone from a new
    cache."""

    async def main():
        engine = GenerationEngine(model.name, model.make_cache(), EngineLimits(max_sequences=8))
        broken = engine.rows

        def fail(*args):
            raise MemoryError("simulated: the cache's bookkeeping broke")

        broken.join = broken.clear = fail
        engine.start()
        try:
            first = [greedy(p, 30) for p in model.prompts[:3]]
            for seq in first:
                engine.submit(seq)
            ends = [r[-1] for r in await asyncio.wait_for(asyncio.gather(*(drain(s) for s in first)), timeout=30)]
            later = greedy(model.prompts[1], LENGTHS[1])
            engine.submit(later)
            return ends, await asyncio.wait_for(drain(later), timeout=30), engine.rows is broken
        finally:
            await engine.close()

    ends, later, same_cache = LOOP.run_until_complete(main())
    assert all(e.finish_reason == FinishReason.ERROR and "generation step failed" in e.error.message for e in ends)
    assert not same_cache and tokens(later) == alone[1]


@pytest.fixture(scope="module")
def fused(manager) -> Model:
    return fused_model(manager)


@pytest.fixture(scope="module")
def traced(manager, traced_runtime) -> Model:
    return traced_model(manager, traced_runtime)


def test_the_fused_graph_generates_the_traced_graphs_tokens(traced, fused):
    """The two graphs, each sequence alone: the same greedy tokens."""
    plain, fast = (
        [tokens(run(g, [greedy(p, n)], EngineLimits(max_sequences=1))[0]) for p, n in zip(fused.prompts, LENGTHS)]
        for g in (traced, fused)
    )
    assert fast == plain


SPECULATIVE = EngineLimits(max_sequences=4, speculative_tokens=8)


def test_speculation_makes_greedys_tokens_in_fewer_runs(fused):
    """Prompt lookup drafts and the fused graph checks them: each sequence alone makes exactly
    the tokens it makes a token a run (120 each, long enough for the small model to repeat
    itself), drafts are kept, and there are fewer steps than tokens."""
    plain, drafted = [], []
    one_by_one = [tokens(run(fused, [greedy(p, 120)], EngineLimits(max_sequences=4), plain)[0]) for p in fused.prompts]
    speculated = [tokens(run(fused, [greedy(p, 120)], SPECULATIVE, drafted)[0]) for p in fused.prompts]
    assert speculated == one_by_one
    assert sum(s.tokens for s in drafted) == 120 * len(fused.prompts)
    kept, proposed = sum(s.accepted_tokens for s in drafted), sum(s.draft_tokens for s in drafted)
    assert 0 < kept <= proposed
    assert len(drafted) == len(plain) - kept  # every kept draft token saved a run
    assert sum(s.draft_tokens for s in plain) == 0


def test_speculation_ends_where_one_at_a_time_ends(fused):
    """eos, a stop sequence and max_new_tokens that fall inside a kept draft ("import os" goes
    on as "import os" lines, drafted from the prompt at once) end the sequence at the same token
    and text as decoding a token a run, in fewer steps."""
    reference = tokens(run(fused, [greedy(fused.prompts[1], 12)], EngineLimits())[0])
    assert fused.text(reference).startswith("import os\nimport os\n")
    endings = [
        lambda: greedy(fused.prompts[1], 120, eos_token_ids=frozenset({reference[2]})),
        lambda: greedy(fused.prompts[1], 120, stop=("s\nimp",), decoder=fused.tokenizer.decoder()),
        lambda: greedy(fused.prompts[1], 37),
    ]
    for job in endings:
        plain_steps, steps = [], []
        plain = run(fused, [job()], EngineLimits(), plain_steps)[0]
        drafted = run(fused, [job()], SPECULATIVE, steps)[0]
        assert [(e.text, e.token_ids, e.finish_reason) for e in drafted] == [
            (e.text, e.token_ids, e.finish_reason) for e in plain
        ]
        assert len(steps) < len(plain_steps) and sum(s.accepted_tokens for s in steps) > 0


def test_speculation_drafts_only_for_a_greedy_sequence_alone(fused, traced):
    """Two rows at once (ONNX Runtime's CPU GroupQueryAttention checks several tokens over a
    cache only at batch one), a sampled sequence, and the traced graph: no drafts, and the same
    tokens as without speculation."""
    cases = [
        (fused, lambda: [greedy(fused.prompts[0], 60), greedy(fused.prompts[2], 60)]),
        (fused, lambda: [Sequence("r", list(fused.prompts[0]), SamplingParams(temperature=1.0, seed=7), 60)]),
        (traced, lambda: [greedy(fused.prompts[0], 60)]),
    ]
    for graph, jobs in cases:
        steps = []
        assert [tokens(e) for e in run(graph, jobs(), SPECULATIVE, steps)] == [
            tokens(e) for e in run(graph, jobs(), EngineLimits(max_sequences=4))
        ]
        assert sum(s.draft_tokens for s in steps) == 0


def test_the_fused_graph_widening_its_buffer_mid_batch_gives_the_traced_graphs_tokens(traced, fused):
    """Three sequences of 150 tokens in one batch: the shared buffer starts 64 columns wide and
    is widened twice while they decode; each gets the traced graph's tokens alone."""
    alone = [tokens(run(traced, [greedy(p, 150)], EngineLimits(max_sequences=1))[0]) for p in fused.prompts[:3]]
    engines = []
    batched = run(fused, [greedy(p, 150) for p in fused.prompts[:3]], EngineLimits(max_sequences=3), engines=engines)
    assert [tokens(e) for e in batched] == alone
    longest = max(len(p) for p in fused.prompts[:3]) + 150
    assert 128 < longest <= 192 == engines[0].rows.width  # 64, then 128, then 192 columns


def test_min_tokens_keeps_eos_away_until_then(model, alone):
    """An eos id that greedy decoding would choose at position k: with min_tokens k + 2 it is
    not chosen before, and the sequence goes on from the next best token; the same with
    speculation on (on the shared buffer, a draft verified over it)."""
    reference = alone[5]
    k = next(i for i in range(1, len(reference)) if reference[i] not in reference[:i])
    eos = frozenset({reference[k]})
    got = tokens(run(model, [greedy(model.prompts[5], 12, eos_token_ids=eos, min_tokens=k + 2)], EngineLimits())[0])
    assert got[:k] == reference[:k] and reference[k] not in got[: k + 2] and len(got) >= k + 2
    assert (
        tokens(run(model, [greedy(model.prompts[5], 12, eos_token_ids=eos)], EngineLimits())[0]) == reference[: k + 1]
    )
    drafted = tokens(run(model, [greedy(model.prompts[5], 12, eos_token_ids=eos, min_tokens=k + 2)], SPECULATIVE)[0])
    assert drafted == got


class RefusingDrafts:
    """The fused graph's runtime, except that a run of several new tokens over a cache fails,
    as a build of ONNX Runtime whose attention takes one new token at a time would."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def io_binding(self):
        return PoisonedBinding(self.runtime.io_binding())

    def run_binding(self, binding):
        ids, mask = binding.input_ids, binding.attention_mask
        if ids.shape[1] > 1 and mask.shape[1] > ids.shape[1]:
            raise InvalidInput("several new tokens over a cache are not supported")
        self.runtime.run_binding(binding.binding)


def test_a_failing_draft_run_turns_speculation_off_and_loses_nothing(fused):
    engines, steps = [], []
    got = tokens(
        run(fused, [greedy(fused.prompts[1], 40)], SPECULATIVE, steps, engines=engines, wrap=RefusingDrafts)[0]
    )
    assert got == tokens(run(fused, [greedy(fused.prompts[1], 40)], EngineLimits())[0])
    assert engines[0].speculative_tokens == 0 and sum(s.draft_tokens for s in steps) == 0


def test_stream_interval_posts_the_first_token_at_once_then_every_fourth(model):
    """Stepped by hand: tokens reach the reader 1, then 4 at a time, the last with the finish,
    and only the steps that hand over tokens wake the event loop; a sequence cancelled while
    tokens are held gets them all before its end."""
    woken = []

    async def main() -> tuple[list[int], list[int], list]:
        engine = GenerationEngine(model.name, model.make_cache(), EngineLimits(stream_interval=4))
        engine._loop = asyncio.get_running_loop()  # no engine thread: steps run here

        def step() -> int:
            engine._post(engine.step())
            woken.append(engine._wake_scheduled)
            posted = sum(len(e.token_ids) for batch, _ in engine._posted for _, events in batch for e in events)
            engine._deliver_posted()
            return posted

        seq = greedy(model.prompts[0], 10)
        engine.submit(seq)
        per_step = [step() for _ in range(10)]
        assert seq.finished
        cancelled = greedy(model.prompts[2], 40)
        engine.submit(cancelled)
        held = [step() for _ in range(3)]  # the first token, then two held
        engine.cancel(cancelled)
        step()
        events = [cancelled.events.get_nowait() for _ in range(cancelled.events.qsize())]
        await engine.close()
        return per_step, held, events

    per_step, held, events = LOOP.run_until_complete(main())
    assert per_step == [1, 0, 0, 0, 4, 0, 0, 0, 4, 1]
    assert woken[:10] == [n > 0 for n in per_step]
    assert held == [1, 0, 0] and len(tokens(events)) == 3 and events[-1].finish_reason == FinishReason.CANCELLED


def test_an_encoder_step_encodes_whole_sources_within_its_own_budget(manager):
    """An encoder reads a source whole: a step encodes sources while its encoder budget lasts
    (at least one), not the decoder's token budget; the tokens are each source's alone."""
    m = seq2seq_model(manager)
    jobs = lambda: [greedy(p, n) for p, n in zip(m.prompts, LENGTHS)]  # noqa: E731
    alone = [tokens(run(m, [greedy(p, n)], EngineLimits(max_sequences=1))[0]) for p, n in zip(m.prompts, LENGTHS)]
    steps = []
    assert [tokens(e) for e in run(m, jobs(), EngineLimits(token_budget=8, encoder_token_budget=12), steps)] == alone
    encoded = [s.prefill_tokens for s in steps if s.prefill_tokens]
    longest = max(map(len, m.prompts))
    assert sum(encoded) == sum(map(len, m.prompts)) and len(encoded) > 1
    assert all(n <= max(12 + longest - 1, longest) for n in encoded)
    steps = []
    assert [tokens(e) for e in run(m, jobs(), EngineLimits(token_budget=8), steps)] == alone
    assert steps[0].prefill_tokens == sum(map(len, m.prompts))  # the default budget takes them all at once


def request(model: Model, config, prompt: list[int], **kw) -> Sequence:
    """A sequence as the APIs build it (generation/requests.py), with these extras."""
    fields = dict(max_new_tokens=30, temperature=None, top_k=None, top_p=None, seed=None, stop=[])
    return to_sequence(
        config,
        GenerateInput(model=model.name, text=None, token_ids=prompt, request_id="x", **{**fields, **kw}),
        64,
        None,
    )


def test_logprobs_and_a_grammar_on_every_cache(model, manager, alone):
    """Greedy with logprobs beside a sequence held to a choice of two strings, on each cache: the
    free one keeps its tokens alone, each with its log-probability (the best of its top 2, as
    greedy chose it); the constrained one writes exactly one of the choices and ends there."""
    config = manager.get(model.name).generation
    free = request(model, config, model.prompts[0], max_new_tokens=LENGTHS[0], logprobs=2, ignore_eos=True)
    held = request(model, config, model.prompts[1], constraint=Constraint("choice", ["alpha beta", "gamma"]))
    events = run(model, [free, held], EngineLimits(max_sequences=4))
    records = [r for e in events[0] for r in e.logprobs]
    assert tokens(events[0]) == alone[0] == [r.token for r in records]
    assert all(r.top[0] == (r.token, r.logprob) and r.logprob <= 0 and len(r.top) == 2 for r in records)
    assert model.text(tokens(events[1])) in {"alpha beta", "gamma"}
    assert events[1][-1].finish_reason == FinishReason.EOS


def test_a_verified_draft_gives_the_same_logprobs(fused, manager):
    """Prompt lookup on the shared buffer with logprobs asked: the tokens and their
    log-probabilities of one token a run, within 1e-4 (a draft's positions run in one pass)."""
    config = manager.get("bytegpt").generation
    prompt = fused.prompts[2]
    plain = run(fused, [request(fused, config, prompt, max_new_tokens=120, logprobs=0)], EngineLimits(max_sequences=4))
    steps = []
    drafted = run(fused, [request(fused, config, prompt, max_new_tokens=120, logprobs=0)], SPECULATIVE, steps)
    assert tokens(drafted[0]) == tokens(plain[0]) and sum(s.accepted_tokens for s in steps) > 0
    got, want = ([r.logprob for e in evs[0] for r in e.logprobs] for evs in (drafted, plain))
    assert len(got) == 120
    np.testing.assert_allclose(got, want, atol=1e-4)


# -- automatic prefix caching (generation/prefix_cache.py) ----------------------------------

SHARED = (  # a shared preamble, as a system prompt is: six 16-token blocks on bytegpt
    "# helpers.py: small functions over lists and strings, each with a docstring and a test.\n"
    "# They are written for clarity, not speed; keep them short and pure, and name them well.\n"
    "# Every function takes its inputs as arguments and returns its result; nothing is global.\n\n"
)


def prefix_cached(graph, runtime, limits: EngineLimits):
    """models.decoder_cache, with the limits' prefix cache."""
    fill_holes, bound = limits.scheduling != "static", limits.prefix_cache_bytes
    if graph.shared_kv:
        return KVSlots(graph, runtime, limits.max_sequences, fill_holes=fill_holes, prefix_cache_bytes=bound)
    return KVRows(graph, runtime, fill_holes=fill_holes, prefix_cache_bytes=bound)


@pytest.fixture(scope="module", params=["KVRows", "KVSlots"])
def decoder(request, manager, traced_runtime) -> Model:
    """Each decoder cache, built with the limits' prefix cache."""
    m = (traced_model if request.param == "KVRows" else fused_model)(manager, traced_runtime)
    return dataclasses.replace(m, factory=partial(prefix_cached, m.factory.args[0]))


def shared_prompts(m: Model) -> list[list[int]]:
    return [m.tokenizer.encode(SHARED + t, False) for t in TEXTS]


def run_in_waves(m: Model, waves: list[list[Sequence]], limits: EngineLimits, steps: list, engines=None) -> list:
    """One engine; each wave submitted once the one before has finished (so it finds the
    prefixes the earlier waves left). Returns each wave's events, sequence by sequence."""

    async def main():
        engine = GenerationEngine(m.name, m.make_cache(), limits, on_step=steps.append)
        if engines is not None:
            engines.append(engine)
        engine.start()
        try:
            results = []
            for wave in waves:
                for seq in wave:
                    engine.submit(seq)
                results.append(await asyncio.gather(*(drain(s) for s in wave)))
            return results
        finally:
            await engine.close()

    return LOOP.run_until_complete(main())


def kept_prefix(prompt: list[int], kept: list[int], block: int = 16) -> int:
    """Tokens of `prompt` a cache holding `kept`'s full blocks restores."""
    common = next((i for i, (a, b) in enumerate(zip(prompt, kept)) if a != b), min(len(prompt), len(kept)))
    return min(common // block, len(kept) // block, (len(prompt) - 1) // block) * block


def test_a_prompt_starting_with_a_kept_prefix_restores_it_and_generates_the_same(decoder):
    """One request, then six more sharing its preamble (one of them the same prompt): each later
    prompt restores the first's full blocks up to where they differ (never its last token) and
    runs only the rest, and every sequence gets the tokens it gets with the cache off. The
    metrics say so."""
    prompts = shared_prompts(decoder)
    first = prompts[0]
    waves = lambda: [[greedy(first, 10)], [greedy(p, n) for p, n in zip(prompts, LENGTHS)]]  # noqa: E731
    on, off = [], []
    with_cache = run_in_waves(decoder, waves(), EngineLimits(max_sequences=8), on)
    without = run_in_waves(decoder, waves(), EngineLimits(max_sequences=8, prefix_cache_bytes=0), off)
    assert [[tokens(e) for e in wave] for wave in with_cache] == [[tokens(e) for e in wave] for wave in without]
    restored = sum(kept_prefix(p, first) for p in prompts)
    assert restored >= 6 * 5 * 16  # the preamble's blocks for each prompt, the first's own (it is 6 blocks long)
    assert sum(s.prefix_cached_tokens for s in on) == restored
    assert sum(s.prefix_queried_tokens for s in on) == len(first) + sum(map(len, prompts))
    assert sum(s.prefill_tokens for s in on) == len(first) + sum(map(len, prompts)) - restored
    assert sum(s.prefill_tokens for s in off) == len(first) + sum(map(len, prompts))
    assert not any(s.prefix_cached_tokens or s.prefix_queried_tokens or s.prefix_cache_bytes for s in off)
    assert max(s.prefix_cache_bytes for s in on) > 0 and sum(s.prefix_evictions for s in on) == 0

    registry = CollectorRegistry()
    observer = ModelObserver(Metrics(registry), decoder.name, 1)
    for s in on[:-1]:  # the last is the closing engine's (its gauges zeroed)
        observer.generation_step(s)
    value = lambda name: registry.get_sample_value(name, {"model": decoder.name, "version": "1"})  # noqa: E731
    assert value("tserve_generation_prefix_cache_hit_tokens_total") == restored
    assert value("tserve_generation_prefix_cache_queried_tokens_total") == len(first) + sum(map(len, prompts))
    assert value("tserve_generation_prefix_cache_bytes") == on[-2].prefix_cache_bytes > 0
    assert value("tserve_generation_prefix_cache_evictions_total") == 0


def test_prompts_arriving_together_find_the_prefix_the_first_is_computing(decoder):
    """Six prompts sharing the preamble, submitted at once with a token budget that takes one
    prompt's chunks a step: each later prompt looks the cache up at its first chunk, not at
    admission, so it starts from the blocks the earlier ones computed meanwhile (blocks are
    kept chunk by chunk), and generates what it generates with the cache off."""
    prompts = shared_prompts(decoder)
    waves = lambda: [[greedy(p, n) for p, n in zip(prompts, LENGTHS)]]  # noqa: E731
    on, off = [], []
    limits = EngineLimits(max_sequences=8, token_budget=48)
    with_cache = run_in_waves(decoder, waves(), limits, on)
    without = run_in_waves(decoder, waves(), dataclasses.replace(limits, prefix_cache_bytes=0), off)
    assert [tokens(e) for e in with_cache[0]] == [tokens(e) for e in without[0]]
    restored = sum(s.prefix_cached_tokens for s in on)
    # the preamble is five blocks; the first prompt has computed them all by the time the third
    # prompt's first chunk is scheduled (the second may start beside the first's last chunk)
    assert restored >= 4 * 5 * 16
    assert sum(s.prefill_tokens for s in on) == sum(map(len, prompts)) - restored


def test_seeded_sampling_and_n_choices_are_the_same_from_a_kept_prefix(decoder, manager):
    """Sampled sequences (seeded) and a request for three choices, after a request that left
    the preamble: the same draws as with the cache off; the choices prefill (and restore) once."""
    config = manager.get(decoder.name).generation
    prompts = shared_prompts(decoder)

    def waves():
        choices = request(decoder, config, prompts[2], temperature=0.9, seed=7, n=3, ignore_eos=True, max_new_tokens=20)
        sampled = [
            Sequence("s", list(p), SamplingParams(temperature=0.9, top_k=40, seed=11 + i), 25)
            for i, p in enumerate(prompts[3:])
        ]
        return [[greedy(prompts[0], 5)], [choices, *sampled]]

    on, off = [], []
    with_cache = run_in_waves(decoder, waves(), EngineLimits(max_sequences=8), on)
    without = run_in_waves(decoder, waves(), EngineLimits(max_sequences=8, prefix_cache_bytes=0), off)
    by_choice = lambda events: [tokens([e for e in events if e.index == i]) for i in range(3)]  # noqa: E731
    assert by_choice(with_cache[1][0]) == by_choice(without[1][0])
    assert len({tuple(c) for c in by_choice(with_cache[1][0])}) == 3
    assert [tokens(e) for e in with_cache[1][1:]] == [tokens(e) for e in without[1][1:]]
    assert sum(s.prefix_cached_tokens for s in on) == sum(kept_prefix(p, prompts[0]) for p in prompts[2:]) > 0


def test_a_sequence_asking_prompt_logprobs_is_not_restored(decoder, manager):
    """Each prompt token's log-probability takes every position's logits: that prompt runs
    whole, beside one that restores, and its records are the cache-off ones."""
    config = manager.get(decoder.name).generation
    prompts = shared_prompts(decoder)

    def waves():
        echo = request(decoder, config, prompts[1], max_new_tokens=5, prompt_logprobs=1)
        return [[greedy(prompts[0], 5)], [echo, greedy(prompts[2], 5)]]

    on, off = [], []
    with_cache = run_in_waves(decoder, waves(), EngineLimits(), on)
    without = run_in_waves(decoder, waves(), EngineLimits(prefix_cache_bytes=0), off)
    records = [[(r.token, r.logprob) for r in wave[1][0][0].prompt_logprobs] for wave in (with_cache, without)]
    assert len(records[0]) == len(prompts[1]) and records[0] == records[1]
    assert sum(s.prefix_cached_tokens for s in on) == kept_prefix(prompts[2], prompts[0]) > 0
    assert sum(s.prefix_queried_tokens for s in on) == len(prompts[0]) + len(prompts[2])


def test_a_bound_of_zero_turns_it_off_and_a_small_one_evicts(decoder):
    """prefix_cache_bytes 0: no prefix cache at all. Three blocks' worth: each prompt's blocks
    evict the last one's, leaf first, within the bound, and the tokens stay the cache-off ones."""
    prompts = shared_prompts(decoder)
    engines = []
    run_in_waves(decoder, [[greedy(prompts[0], 3)]], EngineLimits(prefix_cache_bytes=0), [], engines)
    assert engines[0].rows.prefix_cache is None

    block = 16 * column_bytes(decoder.factory.args[0])
    distinct = [decoder.tokenizer.encode(t * 12, False) for t in ("alpha beta ", "gamma delta ", "epsilon zeta ")]
    assert all(len(p) > 3 * 16 for p in distinct)
    waves = lambda: [[greedy(p, 4)] for p in [*distinct, distinct[0]]]  # noqa: E731
    on, off = [], []
    small = run_in_waves(decoder, waves(), EngineLimits(prefix_cache_bytes=3 * block), on, engines)
    plain = run_in_waves(decoder, waves(), EngineLimits(prefix_cache_bytes=0), off)
    assert [tokens(w[0]) for w in small] == [tokens(w[0]) for w in plain]
    assert max(s.prefix_cache_bytes for s in on) == 3 * block
    assert sum(s.prefix_evictions for s in on) == 3 * 3  # the second, third and fourth prompt evicted three each
    assert sum(s.prefix_cached_tokens for s in on) == 0  # the first prompt's blocks were gone by its return
    assert engines[1].rows.prefix_cache.evictions == 9


def test_an_encoder_decoder_restores_nothing(manager):
    m = seq2seq_model(manager)
    cache = m.make_cache()(EngineLimits())
    assert cache.prefix_cache is None and cache.restore(greedy(m.prompts[0], 3)) == 0


# -- prefill that does not stall decode (generation/pacing.py) -----------------------------


class KnownCosts(PrefillPacer):
    """The engine's pacer fed known timings once and deaf to the engine's own: the rule,
    deterministically (prompt runs 0.5 ms a token, a decode 10.25 ms: 20 tokens a step)."""

    def __init__(self, stall: float) -> None:
        super().__init__(stall)
        for n in (100, 50):
            super().prefill_ran(n, 0.0005 * n)
        super().decode_ran(0.01025)

    def prefill_ran(self, tokens: int, seconds: float) -> None:
        pass

    def decode_ran(self, seconds: float) -> None:
        pass


def test_a_long_prompt_joins_running_rows_in_chunks_the_decode_time_allows(decoder, alone_decoder):
    """Stepped by hand: the first prompt runs whole (nothing is decoding); a long prompt that
    comes while it decodes runs 20 tokens a step, what the costs predict fits one decode step;
    once it runs alone, the rest of a third prompt runs whole. Every sequence gets its tokens alone."""
    prompts = shared_prompts(decoder)
    engine = GenerationEngine(decoder.name, decoder.make_cache(), EngineLimits(max_sequences=4, prefix_cache_bytes=0))
    engine.pacer = KnownCosts(engine.limits.prefill_stall)
    assert engine.pacer.budget(256, running=True) == 20
    short, long = greedy(decoder.prompts[0], 12), greedy(prompts[1], 3)
    engine.submit(short)
    chunks = [engine.step().prefill_tokens]
    engine.submit(long)
    while not long.generated:
        chunks.append(engine.step().prefill_tokens)
    whole, rest = divmod(len(long.prompt), 20)
    assert chunks == [len(short.prompt), *[20] * whole, *([rest] if rest else [])]
    while not engine.idle:
        engine.step()
    later = greedy(prompts[2], 3)
    engine.submit(later)
    assert engine.step().prefill_tokens == len(later.prompt)  # nothing decoding: the whole budget
    while not engine.idle:
        engine.step()
    assert [short.generated, long.generated, later.generated] == alone_decoder([short, long, later])
    LOOP.run_until_complete(engine.close())


@pytest.fixture(scope="module")
def alone_decoder(decoder):
    def alone(seqs: list[Sequence]) -> list[list[int]]:
        return [
            tokens(run(decoder, [greedy(s.prompt, s.max_new_tokens)], EngineLimits(max_sequences=1))[0]) for s in seqs
        ]

    return alone


def test_prefill_stall_zero_gives_the_whole_budget_beside_running_rows(decoder):
    prompts = shared_prompts(decoder)
    limits = EngineLimits(max_sequences=4, prefix_cache_bytes=0, prefill_stall=0)
    engine = GenerationEngine(decoder.name, decoder.make_cache(), limits)
    engine.pacer = KnownCosts(limits.prefill_stall)
    engine.submit(greedy(decoder.prompts[0], 12))
    engine.step()
    long = greedy(prompts[1], 3)
    engine.submit(long)
    assert engine.step().prefill_tokens == len(long.prompt)
    while not engine.idle:
        engine.step()
    LOOP.run_until_complete(engine.close())


# -- KVRows: the step's prompt chunks in one run -------------------------------------------


class CountingRuntime:
    """A runtime that records each run's input_ids shape."""

    def __init__(self, runtime) -> None:
        self.runtime, self.shapes = runtime, []

    def run_sync(self, feeds, outputs):
        self.shapes.append(feeds["input_ids"].shape)
        return self.runtime.run_sync(feeds, outputs)


def test_kvrows_runs_a_steps_prompt_chunks_in_one_run_with_each_ones_logits(traced):
    """Three chunks of different lengths from different pasts (one fresh, two part-prefilled) in
    one run: each chunk's logits and its sequence's cache are those of running it alone (within
    float rounding); then a chunk with a token the graph lacks fails alone, the others as alone."""
    prompts = shared_prompts(traced)
    graph, runtime = traced.factory.args[0], CountingRuntime(traced.runtimes[0])
    jobs = [(prompts[0], 0, 20), (prompts[1], 13, 24), (prompts[2], 30, 22)]  # (prompt, prefilled, chunk)

    def start(cache: KVRows, prompt, prefilled) -> Sequence:
        seq = greedy(prompt, 1)
        if prefilled:
            cache.prefill([(seq, prefilled)])
            seq.prefilled = prefilled
        return seq

    apart = []
    for prompt, prefilled, n in jobs:
        cache = KVRows(graph, runtime)
        seq = start(cache, prompt, prefilled)
        apart.append((cache.prefill([(seq, n)])[0], cache._own[seq]))
    together = KVRows(graph, runtime)
    seqs = [start(together, prompt, prefilled) for prompt, prefilled, _ in jobs]
    runtime.shapes.clear()
    got = together.prefill([(s, n) for s, (_, _, n) in zip(seqs, jobs)])
    assert runtime.shapes == [(3, 24)]  # one run, right-padded to the longest chunk
    for seq, (_, prefilled, n), out, (logits, own) in zip(seqs, jobs, got, apart):
        assert out.shape == logits.shape == (n, logits.shape[-1])
        np.testing.assert_allclose(out, logits, atol=1e-4)
        assert [p.shape for p in together._own[seq]] == [p.shape for p in own]
        for p, q in zip(together._own[seq], own):
            np.testing.assert_allclose(p, q, atol=1e-5)

    bad = greedy([1, 2, 70000, 3], 1)
    cache = KVRows(graph, runtime)
    good = [start(cache, prompt, prefilled) for prompt, prefilled, _ in jobs[:2]]
    runtime.shapes.clear()
    results = cache.prefill([(good[0], 20), (bad, 4), (good[1], 24)])
    assert isinstance(results[1], TServeError)
    assert bad not in cache._own and len(runtime.shapes) > 1  # the batched run failed: each ran alone
    np.testing.assert_allclose(results[0], apart[0][0], atol=1e-4)
    np.testing.assert_allclose(results[2], apart[1][0], atol=1e-4)


def test_kvrows_joiners_prefill_together_and_generate_as_alone(traced):
    """Stepped by hand, six joiners at once: the first step's chunks (the token budget's 256 of
    their prompts) run in one batched run, later chunks beside the decode too, and each sequence
    gets its tokens alone."""
    prompts = shared_prompts(traced)
    alone = [tokens(run(traced, [greedy(p, n)], EngineLimits(max_sequences=1))[0]) for p, n in zip(prompts, LENGTHS)]
    counting = []
    wrap = lambda r: counting.append(CountingRuntime(r)) or counting[-1]  # noqa: E731
    engine = GenerationEngine(traced.name, traced.make_cache(wrap), EngineLimits(prefill_stall=0, token_budget=256))
    seqs = [greedy(p, n) for p, n in zip(prompts, LENGTHS)]
    for seq in seqs:
        engine.submit(seq)
    first = engine.step()
    assert first.prefill_tokens == 256 and counting[0].shapes[0][0] > 1  # several chunks, one run
    while not engine.idle:
        engine.step()
    assert [s.generated for s in seqs] == alone
    LOOP.run_until_complete(engine.close())
