"""The encoder-decoder cache's bookkeeping, in-process: joins move a prefilled slot to the next
running row, a join writes one row (never every row's cross caches), leaves fill holes with
later live rows, every row's caches travel with it, and the cross buffers widen and narrow.
(Runs on real graphs are the engine tests' and test_seq2seq's; here slots are filled by hand.)"""

from __future__ import annotations

import numpy as np

from service.conventions.seq2seq import Seq2SeqGraphs
from service.generation.sampling import SamplingParams
from service.generation.seq2seq_cache import Seq2SeqCache, length_groups
from service.generation.sequence import FinishReason, Sequence
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

GRAPHS = Seq2SeqGraphs(
    1,
    ("present.0.decoder.key", "present.0.decoder.value"),
    ("present.0.encoder.key", "present.0.encoder.value"),
    (),
    True,
    np.dtype(np.float32),
)
HEADS, DIM = 2, 3


def cache(slots: int = 4, width: int = 32, max_source: int = 192) -> Seq2SeqCache:
    c = Seq2SeqCache(
        GRAPHS, None, None, None, decoder_start_token_id=1, pad_token_id=0, slots=slots, max_source=max_source
    )
    c.cross = [np.zeros((slots, HEADS, 0, DIM), np.float32) for _ in range(2)]
    c._fit(width)
    return c


def prefilled(c: Seq2SeqCache, name: str, slot: int, source: int) -> Sequence:
    """A sequence whose source sits in `slot` (as an encoder run leaves it): its cross columns
    and its first self-attention column hold its name's number."""
    seq = Sequence(name, [5] * source, SamplingParams(), 8)
    c._fit(source)
    c.slot_of[seq], c.owner[slot], c.source_len[slot] = slot, seq, source
    for b in c.cross:
        b[slot, :, :source] = float(name)
    c.encoder_mask[slot, :source] = 1
    c._first_self[seq] = [np.full((1, HEADS, 1, DIM), float(name), np.float32) for _ in range(2)]
    return seq


def check(c: Seq2SeqCache, running: list[Sequence]) -> None:
    assert c.seqs == running
    for row, seq in enumerate(running):
        n = len(seq.prompt)
        assert c.slot_of[seq] == row and c.source_len[row] == n
        assert np.all(c.cross[1][row, :, :n] == float(seq.request_id)) and np.all(c.cross[1][row, :, n:] == 0)
        assert c.encoder_mask[row].tolist() == [1] * n + [0] * (c.width - n)
        length = int(c.lengths[row])  # its self-attention columns, right-aligned
        assert np.all(c.self_kv[0][row, :, -length:] == float(seq.request_id))


def test_joins_write_one_row_and_leaves_keep_every_rows_caches():
    c = cache(slots=6)
    a, b = prefilled(c, "1", 0, 10), prefilled(c, "2", 3, 30)  # b was encoded higher up
    d = prefilled(c, "3", 1, 20)  # and d is still waiting to join in slot 1, where b must go
    c.join(a, 10)
    before = [buf.copy() for buf in c.cross]
    c.join(b, 20)  # b moves down to row 1; d, in the way, moves to b's old slot
    assert np.all(c.cross[0][0] == before[0][0])  # the running row's cross caches were not touched
    assert c.slot_of[d] == 3 and np.all(c.cross[0][3, :, :20] == 3.0)
    c.join(d, 30)
    check(c, [a, b, d])
    assert c.next_ids[:3].tolist() == [10, 20, 30] and c.self_kv[0].shape == (3, HEADS, 1, DIM)

    c.self_kv = [np.concatenate([s, s], 2) for s in c.self_kv]  # a decode step: one column more each
    c.lengths[:3] += 1
    a.finish(FinishReason.LENGTH, 0.0)
    c.compact()  # d, the last live row, fills a's hole
    check(c, [d, b])
    assert c.next_ids[:2].tolist() == [30, 20] and c.owner[2:] == [None] * 4 and c.source_len[2:].sum() == 0
    cross_bytes = (20 + 30) * 2 * HEADS * DIM * 4
    assert c.nbytes == cross_bytes + sum(s.nbytes for s in c.self_kv)

    b.finish(FinishReason.EOS, 0.0)
    d.finish(FinishReason.EOS, 0.0)
    c.compact()
    assert len(c) == 0 and c.nbytes == 0 and c.slot_of == {} and c.self_kv == []


def test_a_new_row_is_left_padded_to_the_batchs_self_attention_width():
    c = cache()
    a = prefilled(c, "1", 0, 5)
    c.join(a, 1)
    c.self_kv = [np.concatenate([s] * 4, 2) for s in c.self_kv]  # a has 4 columns
    c.lengths[0] = 4
    b = prefilled(c, "2", 1, 7)
    c.join(b, 2)
    check(c, [a, b])
    assert np.all(c.self_kv[0][1, :, :3] == 0)  # padding before b's one column
    assert c._decoder_mask(c.lengths[:2]).tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_static_batching_keeps_finished_rows_and_clear_spares_a_waiting_slot():
    c = Seq2SeqCache(GRAPHS, None, None, None, 1, 0, slots=3, fill_holes=False)
    c.cross = [np.zeros((3, HEADS, 0, DIM), np.float32) for _ in range(2)]
    a, b = prefilled(c, "1", 0, 4), prefilled(c, "2", 1, 6)
    c.join(a, 1)
    w = prefilled(c, "3", 2, 3)  # encoded, not yet joined
    a.finish(FinishReason.LENGTH, 0.0)
    c.compact()
    assert c.seqs == [a]
    c.clear()
    assert len(c) == 0 and a not in c.slot_of and c.owner[1:] == [b, w]
    c.release(w)  # it was cancelled before it joined
    assert c.owner[2] is None and w not in c._first_self and c.source_len[2] == 0


def test_the_cross_buffers_widen_for_longer_sources_and_narrow_when_they_leave():
    c = cache(width=32)
    assert c.width == 32
    a = prefilled(c, "1", 0, 20)
    c.join(a, 1)
    b = prefilled(c, "2", 1, 100)  # widened by half again at least, in multiples of 32
    assert c.width == 128
    c.join(b, 2)
    check(c, [a, b])
    prefilled(c, "3", 2, 190)
    assert c.width == 192  # never past the longest source
    c.release(c.owner[2])
    b.finish(FinishReason.LENGTH, 0.0)
    c.compact()  # a's 20 columns need under half of 192
    assert c.width == 32
    check(c, [a])


def test_sources_are_grouped_by_length_with_little_padding():
    lengths = [100, 12, 95, 10, 190, 11, 50]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real, padded = sum(lengths[i] for i in g), len(g) * max(lengths[i] for i in g)
        assert real >= 0.8 * padded
    assert [sorted(lengths[i] for i in g) for g in groups] == [[10, 11, 12], [50], [95, 100], [190]]


def test_an_encoder_decoder_whose_cross_buffers_could_pass_the_limit_is_refused_with_the_figure():
    """namegen's cross-attention caches take 2 layers x (key, value) x 4 heads x 32 dims x 4 bytes
    = 2 KiB a source token; 64 slots of its 192-token sources could reach 24 MiB, above a 1 MiB
    limit: UNAVAILABLE, saying what it needs and what to lower."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from service.metrics import Metrics
    from service.models import ModelManager
    from service.settings import Settings
    from tests.conftest import DEFAULT_REPOSITORY

    async def load(limit: int):
        settings = Settings(
            model_repository=DEFAULT_REPOSITORY, generation_max_sequences=64, generation_kv_buffer_max_bytes=limit
        )
        manager = ModelManager(settings, Metrics(CollectorRegistry()))
        await manager.load("namegen")
        mv = manager.get("namegen", ready=False)
        state = (mv.ready, mv.reason)
        await manager.close()
        return state

    ready, reason = asyncio.run(load(1 << 20))
    assert not ready and "cross-attention buffers need 24 MiB" in reason and "--generation-max-sequences" in reason
    assert asyncio.run(load(1 << 30))[0]
