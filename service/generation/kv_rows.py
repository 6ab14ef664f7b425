"""The running batch's KV cache: one row per sequence, left-padded to a common past length.

    past[i]    [rows, heads, columns, head_dim]   one array per past_key_values input
    mask       [rows, columns]                     1 where a row's cache holds a real token
    positions  [rows]                              the next token's position in each sequence
    next_ids   [rows]                              the token each row feeds to the next decode

A decode run's `present` outputs are the next run's `past` as they are (one column longer;
the mask gains a column of ones). A sequence that finishes leaves a *hole*: its mask row is
zeroed so it attends to nothing real, and it keeps computing until a joiner takes the row.
A joiner whose cache is no longer than the batch's is written into a hole in place,
right-aligned; otherwise it is appended and everyone is left-padded to the longer past.
`compact` gathers the live rows and trims columns that are padding for every row, once holes
or dead columns pile up, so joins and leaves cost one sequence's cache, not the batch's.
"""

from __future__ import annotations

import numpy as np

from service.generation.sequence import Sequence


def _left_pad(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    if n == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (n, 0)
    return np.pad(a, widths)


class KVRows:
    def __init__(self, fill_holes: bool = True) -> None:
        # static batching (a benchmark baseline) never reuses a row mid-batch
        self.fill_holes = fill_holes
        self.clear()

    def clear(self) -> None:
        self.seqs: list[Sequence] = []
        self.past: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), np.int64)
        self.positions = np.zeros(0, np.int64)
        self.next_ids = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def live(self) -> int:
        return sum(not s.finished for s in self.seqs)

    @property
    def holes(self) -> int:
        return sum(s.finished for s in self.seqs)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.past)

    # -- decode -----------------------------------------------------------------------------

    def decode_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """(input_ids [B, 1], attention_mask [B, columns + 1], position_ids [B, 1], past)."""
        B = len(self.seqs)
        mask = np.concatenate([self.mask, np.ones((B, 1), np.int64)], axis=1)
        return self.next_ids[:, None], mask, self.positions[:, None], self.past

    def advance(self, present: list[np.ndarray], mask: np.ndarray) -> None:
        """Take a decode run's presents as the cache (one column longer)."""
        # ONNX Runtime's outputs are fresh arrays the engine owns: joiners are written into them
        self.past = [p if p.flags.writeable else p.copy() for p in present]
        self.mask = mask
        self.positions = self.positions + 1

    def make_hole(self, row: int) -> None:
        self.mask[row] = 0
        self.next_ids[row] = 0  # a hole still computes: never with a token that made a run fail

    # -- joins and leaves -------------------------------------------------------------------

    def join(self, seq: Sequence, cache: list[np.ndarray], token: int) -> None:
        """Add a prefilled sequence whose cache is `cache` ([1, heads, length, head_dim] each)
        and whose next input is `token`."""
        length = cache[0].shape[2]
        if not self.seqs:
            self.seqs = [seq]
            self.past, self.mask = list(cache), np.ones((1, length), np.int64)
            self.positions = np.array([length], np.int64)
            self.next_ids = np.array([token], np.int64)
            return
        current = self.mask.shape[1]
        hole = next((i for i, s in enumerate(self.seqs) if s.finished), None) if self.fill_holes else None
        if hole is not None and length <= current:
            for p, own in zip(self.past, cache):
                p[hole, :, current - length :] = own[0]
            self.mask[hole] = 0
            self.mask[hole, current - length :] = 1
            self.positions[hole] = length
            self.next_ids[hole] = token
            self.seqs[hole] = seq
            return
        target = max(current, length)
        self.past = [np.concatenate([_left_pad(p, target - current, 2), _left_pad(own, target - length, 2)])
                     for p, own in zip(self.past, cache)]
        self.mask = np.concatenate([_left_pad(self.mask, target - current, 1),
                                    _left_pad(np.ones((1, length), np.int64), target - length, 1)])
        self.positions = np.append(self.positions, length)
        self.next_ids = np.append(self.next_ids, token)
        self.seqs.append(seq)

    def dead_columns(self) -> int:
        """Leading columns that are padding in every row."""
        live = self.mask.any(axis=0)
        return int(np.argmax(live)) if live.any() else self.mask.shape[1]

    def compact_if_sparse(self) -> bool:
        """Compact once holes are half the rows or dead columns a quarter of the width (at
        least 16). Returns whether it did."""
        if not self.seqs:
            return False
        holes = self.holes
        if (holes and 2 * holes >= len(self.seqs)) or self.dead_columns() >= max(16, self.mask.shape[1] // 4):
            self.compact()
            return True
        return False

    def compact(self) -> None:
        """Keep only the live rows, and trim the columns that are padding for all of them."""
        keep = [i for i, s in enumerate(self.seqs) if not s.finished]
        if not keep:
            self.clear()
            return
        index = np.array(keep)
        mask = self.mask[index]
        first = int(np.argmax(mask.any(axis=0)))
        self.mask = mask[:, first:]
        self.past = [np.ascontiguousarray(p[index, :, first:]) for p in self.past]
        self.positions = self.positions[index]
        self.next_ids = self.next_ids[index]
        self.seqs = [self.seqs[i] for i in keep]
