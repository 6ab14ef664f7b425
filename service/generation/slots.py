"""The slot table two caches share: running rows are slots 0..rows-1 of preallocated buffers.

KVSlots (a decoder's shared KV buffer) and Seq2SeqCache (an encoder-decoder's cross-attention
caches) both keep one sequence per slot: a sequence being prefilled takes a free slot above the
running rows, moves down to slot `rows` when it joins, and finished rows are dropped by moving
later live rows into their slots, so the running rows stay one contiguous view of the buffers.
This class keeps who holds which slot; the caches move their own arrays (`_move_data`) and
reset a freed slot's (`_reset`).
"""

from __future__ import annotations

from service.generation.sequence import Sequence


class SlotTable:
    def __init__(self, slots: int) -> None:
        self.owner: list[Sequence | None] = [None] * slots
        self.slot_of: dict[Sequence, int] = {}  # every sequence holding a slot: running or prefilling
        self.rows = 0

    def _move_data(self, src: int, dst: int) -> None:
        """Exchange slots `src` and `dst`'s arrays (`dst` may be free)."""
        raise NotImplementedError

    def _reset(self, slot: int) -> None:
        """A freed slot's arrays back to empty."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.rows

    @property
    def seqs(self) -> list[Sequence]:
        return self.owner[: self.rows]

    @property
    def live(self) -> int:
        return sum(not s.finished for s in self.seqs)

    def slot(self, seq: Sequence) -> int:
        """The sequence's slot, a free one above the running rows when it has none yet."""
        slot = self.slot_of.get(seq)
        if slot is None:
            slot = self.slot_of[seq] = next(s for s in range(self.rows, len(self.owner)) if self.owner[s] is None)
            self.owner[slot] = seq
            self._reset(slot)
        return slot

    def release(self, seq: Sequence) -> None:
        """A sequence that ends before it joins gives its slot back (a running row's stays until
        compaction or clear)."""
        slot = self.slot_of.get(seq)
        if slot is not None and slot >= self.rows:
            self._free(slot)

    def _free(self, slot: int) -> None:
        del self.slot_of[self.owner[slot]]
        self.owner[slot] = None
        self._reset(slot)

    def _move(self, src: int, dst: int) -> None:
        """Move slot `src`'s sequence to slot `dst`; a sequence at `dst` takes `src` in exchange."""
        mover, other = self.owner[src], self.owner[dst]
        self._move_data(src, dst)
        self.owner[src], self.owner[dst] = other, mover
        self.slot_of[mover] = dst
        if other is not None:
            self.slot_of[other] = src
        else:
            self._reset(src)

    def _join_slot(self, seq: Sequence) -> int:
        """Make a slotted sequence the next running row; returns its row."""
        if self.slot_of[seq] != self.rows:
            self._move(self.slot_of[seq], self.rows)
        self.rows += 1
        return self.rows - 1

    def _drop_finished(self) -> list[tuple[int, int]] | None:
        """Free the finished running rows and move later live rows into their slots; the
        (from, to) moves made, or None when no row had finished."""
        finished = [r for r in range(self.rows) if self.owner[r].finished]
        if not finished:
            return None
        live = self.rows - len(finished)
        movers = [r for r in range(live, self.rows) if not self.owner[r].finished]
        for row in finished:
            self._free(row)
        moves = list(zip(movers, (r for r in finished if r < live)))
        for src, dst in moves:
            self._move(src, dst)
        self.rows = live
        return moves

    def _clear_rows(self) -> None:
        for row in range(self.rows):
            self._free(row)
        self.rows = 0
