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
A sequence being prefilled keeps its own cache here (`_own`) until it joins. The step's prompt
chunks of similar lengths run in one batch: each row's past left-padded to the longest past,
its new tokens right after it and right-padded to the longest chunk, so a real token never
attends to padding that causality would let it see, and each padding query still sees real
tokens before it (no fully masked row for the graph's softmax).

Implements generation/cache.py's KVCache; it verifies no drafts.
"""

from __future__ import annotations

import numpy as np

from service.conventions.decoder import DecoderGraph
from service.errors import TServeError
from service.generation.cache import length_groups, prefill_each
from service.generation.prefix_cache import PrefixCache, concatenated
from service.generation.sequence import Sequence
from service.runtime import OrtRuntime


def _left_pad(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    if n == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (n, 0)
    return np.pad(a, widths)


class KVRows:
    chunked_prefill = True

    def __init__(
        self, graph: DecoderGraph, runtime: OrtRuntime, fill_holes: bool = True, prefix_cache_bytes: int = 0
    ) -> None:
        self.graph, self.runtime = graph, runtime
        # static batching (a benchmark baseline) never reuses a row mid-batch
        self.fill_holes = fill_holes
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._own: dict[Sequence, list[np.ndarray]] = {}  # the past of each sequence being prefilled
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
        return sum(p.nbytes for p in self.past) + sum(p.nbytes for own in self._own.values() for p in own)

    # -- running the graph ------------------------------------------------------------------

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> list[np.ndarray | TServeError]:
        """The chunks on their sequences' own caches (which this extends): chunks of similar
        lengths in one run (grouped so padding stays under a fifth of the new tokens); a failed
        batched run is re-run a chunk at a time, so only the culprit fails."""
        results: list[np.ndarray | TServeError | None] = [None] * len(chunks)
        for group in length_groups([n for _, n in chunks]):
            batch = [chunks[i] for i in group]
            if len(batch) > 1 and self._fits(batch):
                try:
                    for i, logits in zip(group, self._prefill_batch(batch)):
                        results[i] = logits
                    continue
                except TServeError:
                    pass  # find the chunk that made it fail: each runs alone
            for i, result in zip(group, prefill_each(batch, self._prefill)):
                results[i] = result
        return results

    def _fits(self, batch: list[tuple[Sequence, int]]) -> bool:
        """A batched run's columns (the longest past + the longest chunk) within the context."""
        columns = max(seq.prefilled for seq, _ in batch) + max(n for _, n in batch)
        return not self.graph.max_length or columns <= self.graph.max_length

    def _prefill(self, seq: Sequence, n: int) -> np.ndarray:
        return self._prefill_batch([(seq, n)])[0]

    def _prefill_batch(self, chunks: list[tuple[Sequence, int]]) -> list[np.ndarray]:
        """One run for these chunks: row i is chunk i's sequence, its past left-padded to the
        longest (P columns), its n_i new tokens from column P, right-padded to the longest chunk
        (T). Returns each chunk's logits [n_i, vocab]; each sequence's past grows by its n_i."""
        graph, B = self.graph, len(chunks)
        starts = [seq.prefilled for seq, _ in chunks]
        P, T = max(starts), max(n for _, n in chunks)
        ids = np.zeros((B, T), np.int64)
        mask = np.zeros((B, P + T), np.int64)
        positions = np.zeros((B, T), np.int64)
        pasts = []
        for i, ((seq, n), start) in enumerate(zip(chunks, starts)):
            ids[i, :n] = seq.prompt[start : start + n]
            mask[i, P - start : P + n] = 1
            positions[i, :n] = np.arange(start, start + n)
            positions[i, n:] = start + n - 1  # padding: any position the graph has
            own = self._own.get(seq) or graph.empty_past(1)
            pasts.append([_left_pad(p, P - start, 2) for p in own])  # [1, heads, P, head_dim] each
        past = pasts[0] if B == 1 else [np.concatenate(layer) for layer in zip(*pasts)]
        out = self.runtime.run_sync(graph.feeds(ids, mask, positions, past), graph.outputs)
        logits = []
        for i, ((seq, n), start) in enumerate(zip(chunks, starts)):
            own = out[1:] if B == 1 else [np.ascontiguousarray(p[i : i + 1, :, P - start : P + n]) for p in out[1:]]
            self._own[seq] = own
            if self.prefix_cache is not None:  # keep the full blocks computed so far: a prompt beside it may use them
                self.prefix_cache.insert(seq.prompt[: start + n], lambda a, b, own=own: [p[0, :, a:b] for p in own])
            logits.append(out[0][i, :n])
        return logits

    def restore(self, seq: Sequence) -> int:
        """The kept blocks that start the prompt as `seq`'s own past: [1, heads, n, head_dim] each."""
        blocks = self.prefix_cache.lookup(seq.prompt) if self.prefix_cache is not None else []
        if not blocks:
            return 0
        self._own[seq] = [columns[None] for columns in concatenated(blocks)]
        return len(blocks) * self.prefix_cache.block_tokens

    def release(self, seq: Sequence) -> None:
        self._own.pop(seq, None)

    def fork(self, src: Sequence, dst: Sequence) -> None:
        self._own[dst] = [a.copy() for a in self._own[src]]

    def _decode_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """(input_ids [B, 1], attention_mask [B, columns + 1], position_ids [B, 1], past)."""
        B = len(self.seqs)
        mask = np.concatenate([self.mask, np.ones((B, 1), np.int64)], axis=1)
        return self.next_ids[:, None], mask, self.positions[:, None], self.past

    def decode(self) -> np.ndarray:
        """One token for every row (holes too); the last logits [rows, vocab]."""
        ids, mask, positions, past = self._decode_inputs()
        out = self.runtime.run_sync(self.graph.feeds(ids, mask, positions, past), self.graph.outputs)
        self._advance(out[1:], mask)
        return out[0][:, -1]

    def decode_apart(self) -> tuple[np.ndarray | None, dict[int, TServeError]]:
        """After a failed batched decode: each live row alone. Returns the logits of the rows
        that ran (zeros elsewhere; None if none ran, and the cache is then unchanged) and why
        each other row failed."""
        graph, (ids, mask, positions, past) = self.graph, self._decode_inputs()
        outs, failed = [], {}
        for row, seq in enumerate(self.seqs):
            if seq.finished:
                outs.append(None)
                continue
            one = slice(row, row + 1)
            try:
                outs.append(
                    self.runtime.run_sync(
                        graph.feeds(ids[one], mask[one], positions[one], [p[one] for p in past]), graph.outputs
                    )
                )
            except TServeError as e:
                failed[row] = e
                outs.append(None)
        ran = next((o for o in outs if o is not None), None)
        if ran is None:
            return None, failed
        merged = [
            np.concatenate([o[k] if o is not None else np.zeros_like(ran[k]) for o in outs]) for k in range(len(ran))
        ]
        self._advance(merged[1:], mask)
        return merged[0][:, -1], failed

    def _advance(self, present: list[np.ndarray], mask: np.ndarray) -> None:
        """Take a decode run's presents as the cache (one column longer)."""
        # ONNX Runtime's outputs are fresh arrays the engine owns: joiners are written into them
        self.past = [p if p.flags.writeable else p.copy() for p in present]
        self.mask = mask
        self.positions = self.positions + 1

    def feed(self, row: int, token: int) -> None:
        self.next_ids[row] = token

    def finish(self, row: int) -> None:
        self.mask[row] = 0
        self.next_ids[row] = 0  # a hole still computes: never with a token that made a run fail

    def max_draft(self) -> int:
        return 0  # drafts are checked on a shared buffer only (KVSlots)

    def verify(self, draft: list[int]) -> np.ndarray:
        raise NotImplementedError("KVRows verifies no drafts (max_draft is 0)")

    def accept(self, row: int, n: int) -> None:
        raise NotImplementedError("KVRows verifies no drafts (max_draft is 0)")

    # -- joins and leaves -------------------------------------------------------------------

    def join(self, seq: Sequence, token: int) -> None:
        """Add a prefilled sequence (its own cache: [1, heads, length, head_dim] each) whose next
        input is `token`."""
        cache = self._own.pop(seq)
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
        self.past = [
            np.concatenate([_left_pad(p, target - current, 2), _left_pad(own, target - length, 2)])
            for p, own in zip(self.past, cache)
        ]
        self.mask = np.concatenate(
            [_left_pad(self.mask, target - current, 1), _left_pad(np.ones((1, length), np.int64), target - length, 1)]
        )
        self.positions = np.append(self.positions, length)
        self.next_ids = np.append(self.next_ids, token)
        self.seqs.append(seq)

    def dead_columns(self) -> int:
        """Leading columns that are padding in every row."""
        live = self.mask.any(axis=0)
        return int(np.argmax(live)) if live.any() else self.mask.shape[1]

    def compact(self) -> None:
        """Compact once holes are half the rows or dead columns a quarter of the width (at
        least 16); static batching never does."""
        if not (self.seqs and self.fill_holes):
            return
        holes = self.holes
        if (holes and 2 * holes >= len(self.seqs)) or self.dead_columns() >= max(16, self.mask.shape[1] // 4):
            self.gather_live()

    def gather_live(self) -> None:
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
