"""The running batch's KV cache, in-process: joins, holes filled in place, compaction. (The
rows' runs on a real graph are the engine tests'; these build caches by hand, with no graph.)"""

from __future__ import annotations

import numpy as np

from service.generation.kv_rows import KVRows
from service.generation.sampling import SamplingParams
from service.generation.sequence import FinishReason, Sequence
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

HEADS, HEAD_DIM, LAYERS = 2, 3, 2


def seq(name: str) -> Sequence:
    return Sequence(name, [1, 2], SamplingParams(), 8)


def cache(length: int, value: float) -> list[np.ndarray]:
    """A one-row cache whose every entry says which sequence and position it belongs to."""
    base = value + np.arange(length, dtype=np.float32)[None, None, :, None] / 100
    return [np.broadcast_to(base, (1, HEADS, length, HEAD_DIM)).copy() for _ in range(2 * LAYERS)]


def join(rows: KVRows, s: Sequence, prefilled: list[np.ndarray], token: int) -> None:
    rows._own[s] = prefilled  # as its prefill would leave it
    rows.join(s, token)
    assert s not in rows._own and rows.nbytes == sum(p.nbytes for p in rows.past)  # the rows hold it now


def row_tokens(rows: KVRows, row: int) -> np.ndarray:
    """The real (unmasked) cache entries of a row, as the attention would see them."""
    return rows.past[0][row, 0, rows.mask[row].astype(bool), 0]


def test_joins_left_pad_to_the_longest_past():
    rows = KVRows(None, None)
    a, b = seq("a"), seq("b")
    join(rows, a, cache(3, 1.0), 5)
    join(rows, b, cache(5, 2.0), 6)
    assert rows.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert rows.positions.tolist() == [3, 5] and rows.next_ids.tolist() == [5, 6]
    assert np.allclose(row_tokens(rows, 0), [1.0, 1.01, 1.02])
    assert np.allclose(row_tokens(rows, 1), [2.0, 2.01, 2.02, 2.03, 2.04])


def test_a_joiner_fills_a_hole_in_place():
    rows = KVRows(None, None)
    a, b, c = seq("a"), seq("b"), seq("c")
    join(rows, a, cache(4, 1.0), 5)
    join(rows, b, cache(4, 2.0), 6)
    a.finish(FinishReason.LENGTH, 0.0)
    rows.finish(0)
    width = rows.mask.shape[1]
    join(rows, c, cache(2, 3.0), 7)
    assert rows.seqs == [c, b] and rows.mask.shape[1] == width  # no new row, no new column
    assert rows.mask[0].tolist() == [0, 0, 1, 1] and rows.positions[0] == 2 and rows.next_ids[0] == 7
    assert np.allclose(row_tokens(rows, 0), [3.0, 3.01]) and np.allclose(row_tokens(rows, 1), 2.0 + np.arange(4) / 100)


def test_a_longer_joiner_is_appended_not_squeezed_into_a_hole():
    rows = KVRows(None, None)
    a, b = seq("a"), seq("b")
    join(rows, a, cache(2, 1.0), 5)
    a.finish(FinishReason.LENGTH, 0.0)
    rows.finish(0)
    join(rows, b, cache(4, 2.0), 6)
    assert rows.seqs == [a, b] and rows.mask.shape == (2, 4)


def test_static_batching_never_reuses_a_row():
    rows = KVRows(None, None, fill_holes=False)
    a, b, c = seq("a"), seq("b"), seq("c")
    join(rows, a, cache(3, 1.0), 5)
    join(rows, b, cache(3, 2.0), 6)
    a.finish(FinishReason.LENGTH, 0.0)
    join(rows, c, cache(2, 3.0), 7)
    assert rows.seqs == [a, b, c]


def test_compaction_keeps_live_rows_and_trims_dead_columns():
    rows = KVRows(None, None)
    seqs = [seq(str(i)) for i in range(4)]
    join(rows, seqs[0], cache(40, 0.0), 1)  # the long one
    for i, s in enumerate(seqs[1:], 1):
        join(rows, s, cache(3, float(i)), 1)
    rows.compact()
    assert rows.seqs == seqs  # nothing to gain yet
    seqs[0].finish(FinishReason.LENGTH, 0.0)
    rows.finish(0)
    # one hole in four rows is not sparse, but 37 dead leading columns of 40 are
    rows.compact()
    assert rows.seqs == seqs[1:] and rows.mask.shape == (3, 3) and rows.mask.all()
    for row, value in enumerate([1.0, 2.0, 3.0]):
        assert np.allclose(row_tokens(rows, row), value + np.arange(3) / 100)
    for s in seqs[1:]:
        s.finish(FinishReason.EOS, 0.0)
    rows.compact()
    assert len(rows) == 0 and rows.past == []


def test_decode_inputs_and_advance():
    rows = KVRows(None, None)
    join(rows, seq("a"), cache(2, 1.0), 9)
    ids, mask, positions, past = rows._decode_inputs()
    assert ids.tolist() == [[9]] and mask.tolist() == [[1, 1, 1]] and positions.tolist() == [[2]]
    present = [np.concatenate([p, np.zeros((1, HEADS, 1, HEAD_DIM), np.float32)], axis=2) for p in past]
    present[0].flags.writeable = False  # as ORT may hand out read-only arrays
    rows._advance(present, mask)
    assert rows.positions.tolist() == [3] and rows.mask.shape == (1, 3) and rows.past[0].flags.writeable
