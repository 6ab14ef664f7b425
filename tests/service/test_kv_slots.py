"""The shared KV buffer's bookkeeping, in-process: joins move a prefilled slot to the next
running row, leaves fill holes with later live rows, and every row's columns travel with it.
(Runs on a real graph are the engine tests' and test_fused_generation's; here the slots are
filled by hand, with no graph run.)"""

from __future__ import annotations

import numpy as np

from service.conventions.decoder import DecoderGraph, KVInput
from service.generation.kv_slots import KVSlots
from service.generation.sampling import SamplingParams
from service.generation.sequence import FinishReason, Sequence
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

GRAPH = DecoderGraph(
    (
        KVInput("past_key_values.0.key", 2, 3, np.dtype(np.float32)),
        KVInput("past_key_values.0.value", 2, 3, np.dtype(np.float32)),
    ),
    has_position_ids=True,
    shared_kv=True,
    max_length=16,
)


def prefilled(slots: KVSlots, name: str, slot: int, length: int) -> Sequence:
    """A sequence whose prompt sits in `slot`: its columns hold its name's number."""
    seq = Sequence(name, [1] * length, SamplingParams(), 4)
    slots.slot_of[seq], slots.owner[slot], slots.lengths[slot] = slot, seq, length
    for b in slots.buffers:
        b[slot, :, :length] = float(name)
    return seq


def columns(slots: KVSlots, seq: Sequence) -> np.ndarray:
    return slots.buffers[1][slots.slot_of[seq], 0, : slots.lengths[slots.slot_of[seq]], 0]


def check(slots: KVSlots, running: list[Sequence]) -> None:
    assert slots.seqs == running
    for row, seq in enumerate(running):
        assert slots.slot_of[seq] == row and np.all(columns(slots, seq) == float(seq.request_id))


def test_joins_and_leaves_keep_rows_contiguous_and_caches_whole():
    slots = KVSlots(GRAPH, runtime=None, slots=6)
    a, b = prefilled(slots, "1", 0, 3), prefilled(slots, "2", 3, 5)  # b was prefilled higher up
    c = prefilled(slots, "3", 1, 2)  # and c is still prefilling in slot 1, where b must go
    slots.join(a, 10)
    slots.join(b, 20)  # b moves down to row 1; c, in the way, moves to b's old slot
    assert slots.slot_of[c] == 3 and np.all(columns(slots, c) == 3.0)
    slots.join(c, 30)
    check(slots, [a, b, c])
    assert slots.next_ids[:3].tolist() == [10, 20, 30] and slots.lengths[:3].tolist() == [3, 5, 2]

    a.finish(FinishReason.LENGTH, 0.0)
    slots.compact()  # c, the last live row, fills a's hole
    check(slots, [c, b])
    assert slots.next_ids[:2].tolist() == [30, 20] and slots.owner[2:] == [None] * 4
    assert slots.nbytes == (2 + 5) * 2 * (2 * 3 * 4)  # columns in use x (key, value) x heads x head_dim x 4 bytes

    b.finish(FinishReason.EOS, 0.0)
    c.finish(FinishReason.EOS, 0.0)
    slots.compact()
    assert len(slots) == 0 and slots.nbytes == 0 and slots.slot_of == {}


def test_static_batching_keeps_finished_rows():
    slots = KVSlots(GRAPH, runtime=None, slots=2, fill_holes=False)
    a, b = prefilled(slots, "1", 0, 3), prefilled(slots, "2", 1, 4)
    slots.join(a, 1)
    slots.join(b, 2)
    a.finish(FinishReason.LENGTH, 0.0)
    slots.compact()
    check(slots, [a, b])


def test_clearing_the_rows_leaves_a_prefilling_slot_alone():
    """Static batching clears the running rows when they all end; a sequence still being
    prefilled keeps its slot and its columns, and a newcomer gets another slot."""
    slots = KVSlots(GRAPH, runtime=None, slots=3)
    a, b = prefilled(slots, "1", 0, 3), prefilled(slots, "2", 1, 6)
    slots.join(a, 1)
    a.finish(FinishReason.LENGTH, 0.0)
    slots.clear()
    assert len(slots) == 0 and a not in slots.slot_of and slots.owner[1] is b and np.all(columns(slots, b) == 2.0)
    slots.join(b, 2)
    check(slots, [b])


def test_the_buffers_widen_for_longer_sequences_and_narrow_when_they_leave():
    graph = DecoderGraph(GRAPH.past, has_position_ids=True, shared_kv=True, max_length=300)
    slots = KVSlots(graph, runtime=None, slots=4)
    assert slots.width == 64  # not the context
    a, b = prefilled(slots, "1", 0, 40), prefilled(slots, "2", 1, 60)
    slots.join(a, 10)
    slots.join(b, 20)
    slots._fit(61)  # a step that writes column 61: room already
    assert slots.width == 64
    slots.lengths[1] = 64  # b decoded on to the buffer's edge
    for buf in slots.buffers:
        buf[1, :, 60:64] = 2.0
    slots._fit(65)  # widened by half again, rounded up to 64 columns, with every column kept
    assert slots.width == 128
    check(slots, [a, b])
    slots._fit(299)  # never past the context
    assert slots.width == 300
    check(slots, [a, b])
    b.finish(FinishReason.LENGTH, 0.0)
    slots.compact()  # a's 40 columns need under a third of 300
    assert slots.width == 64
    check(slots, [a])
