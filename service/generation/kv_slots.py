"""The running batch's KV cache for graphs that read each row's length from the attention mask
(GroupQueryAttention, as onnxruntime-genai's model builder emits): one preallocated buffer per
past input, bound with ONNX Runtime's IO binding as both that past and its present, so a step
writes its new keys and values in place and nothing copies the cache per token.

    buffer[i]  [slots, heads, width, head_dim]   slot s holds one sequence, from column 0
    lengths    [slots]                            tokens cached in each slot
    mask       [rows, max(lengths) + 1]           1 over a row's cache and its new token

The running rows are slots 0..rows-1, so a decode binds the buffers' leading rows as they are
(a view, no copy). A sequence being prefilled owns a free slot above them and moves down when
it joins; finished rows are dropped at compaction, later live rows moving into their slots (one
sequence's columns copied, never the batch's). A step on a mixed batch gives each row what a
run alone would (the same tokens, within float rounding): a row's new token goes to its own
column `length`, and it attends to its own columns only.

The buffers are as wide as the longest sequence needs, not the context: ONNX Runtime's CPU
GroupQueryAttention costs more per step the wider its buffer is at batch > 1 (16 rows of the
bench's tiny Llama: 0.92 ms a step 160 columns wide, 1.31 ms at 512, 2.96 ms at 2048, as
measured by hand), so a step must not pay for the context a model allows but no sequence uses.
A run that needs more columns widens the buffers first (by half again, in multiples of 64, up
to the context: one copy of every slot's columns up to the longest, old and new buffers held
at once for it); when the longest sequence left in a running batch needs under a third of the
width, they narrow again. An emptied batch keeps its width (one stream after another would
otherwise reallocate the buffers for every sequence), so after a long sequence the next batch
runs wide until its first compaction. The model manager refuses a model whose widest buffers
(slots x context) would exceed `generation_kv_buffer_max_bytes`;
`tserve_generation_kv_cache_bytes` counts the columns in use.

Implements generation/cache.py's KVCache, drafts included: a row running alone verifies a
prompt-lookup draft (ONNX Runtime's CPU GroupQueryAttention takes several new tokens over a
cache only at batch one).
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from service.conventions.decoder import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, DecoderGraph
from service.errors import TServeError
from service.generation.cache import prefill_each
from service.generation.prefix_cache import PrefixCache, concatenated
from service.generation.sequence import Sequence
from service.generation.slots import SlotTable
from service.runtime import OrtRuntime


WIDTH_STEP = 64  # buffer widths are multiples of this many columns


def column_bytes(graph: DecoderGraph) -> int:
    return sum(t.heads * t.head_dim * t.dtype.itemsize for t in graph.past)


def lazy_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros whose pages the kernel maps only when a run touches them, 4 KiB at a time: an
    anonymous mmap. numpy's own large arrays ask for transparent huge pages, so a run reading a
    few columns of each slot of a freshly widened buffer faulted in every 2 MiB page around
    them: the first decode after widening a SmolLM-shaped buffer to 1,536 columns took 0.7-3 s,
    against 0.04 s like this (by hand, 15 rows)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < 1 << 20:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, size), dtype).reshape(shape)


def _width(columns: int, max_length: int) -> int:
    return min(max_length, -(-columns // WIDTH_STEP) * WIDTH_STEP)


class KVSlots(SlotTable):
    chunked_prefill = True

    def __init__(
        self,
        graph: DecoderGraph,
        runtime: OrtRuntime,
        slots: int,
        fill_holes: bool = True,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.graph, self.runtime = graph, runtime
        # static batching (a benchmark baseline) keeps finished rows computing until all end
        self.fill_holes = fill_holes
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.min_width = _width(WIDTH_STEP, graph.max_length)
        self.buffers = self._allocate(slots, self.min_width)
        self.column_bytes = column_bytes(graph)  # one token of one sequence, every past input
        self.lengths = np.zeros(slots, np.int64)
        super().__init__(slots)
        self.next_ids = np.zeros(slots, np.int64)
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._values: list[ort.OrtValue] = []  # the bound views, held whatever ORT holds itself
        self._logits: np.ndarray | None = None  # [slots, 1, vocab]: decode runs write here
        self._logit_values: dict[tuple[int, int], ort.OrtValue] = {}
        self._logits_bound: set[tuple[int, int]] = set()  # bindings whose logits output is ours

    def clear(self) -> None:
        """Drop the running rows (their sequences have ended); slots being prefilled stay theirs."""
        self._clear_rows()

    @property
    def width(self) -> int:
        return self.buffers[0].shape[2]

    def _allocate(self, slots: int, width: int) -> list[np.ndarray]:
        return [lazy_zeros((slots, t.heads, width, t.head_dim), t.dtype) for t in self.graph.past]

    def _resize(self, width: int) -> None:
        """New buffers `width` columns wide, holding every slot's columns; the bindings of the
        old ones are dropped. Each slot's own columns are copied, not every slot as wide as the
        longest: a 1,500-token prompt joining 15 short rows of a 32-slot SmolLM-shaped buffer
        copied 1.7 GB that way, most of it never written (steps of 0.5-4.5 s, by hand); the
        new buffers' other pages stay untouched until a run writes them."""
        buffers = self._allocate(len(self.owner), width)
        for slot in np.flatnonzero(self.lengths):
            keep = min(width, int(self.lengths[slot]))
            for new, old in zip(buffers, self.buffers):
                new[slot, :, :keep] = old[slot, :, :keep]
        self.buffers = buffers
        self._bindings.clear()
        self._values.clear()
        self._logits_bound.clear()

    def _fit(self, columns: int) -> None:
        """Widen the buffers for a run whose mask is `columns` wide (it writes up to column
        `columns` - 1)."""
        if columns > self.width:
            self._resize(_width(max(columns, self.width * 3 // 2), self.graph.max_length))

    def _narrow_if_wide(self) -> None:
        """After sequences leave a running batch: narrow the buffers when the longest left needs
        under a third of the width (a step of a batch costs more the wider they are)."""
        # what the sequences held need: running rows what they have, one being prefilled what it
        # will have (its buffer was widened for that at its first chunk: never narrowed under it)
        needed = max(
            [int(self.lengths.max())]
            + [len(seq.prompt) + seq.max_new_tokens for slot, seq in enumerate(self.owner) if seq and slot >= self.rows]
        )
        target = max(self.min_width, _width(min(needed, self.graph.max_length) * 3 // 2 + 1, self.graph.max_length))
        if target * 2 <= self.width:
            self._resize(target)

    @staticmethod
    def reserved_bytes(graph: DecoderGraph, slots: int) -> int:
        """The buffers at their widest: every slot the model's whole context."""
        return slots * graph.max_length * column_bytes(graph)

    @property
    def nbytes(self) -> int:
        """Bytes of cache in use (the buffers are `width` columns wide a slot)."""
        return int(self.lengths.sum()) * self.column_bytes

    # -- running the graph ------------------------------------------------------------------

    def _binding(self, start: int, stop: int) -> ort.IOBinding:
        """The binding of slots [start, stop) as past and present, made once per range: the
        buffers never move, so a step only rebinds its small inputs."""
        binding = self._bindings.get((start, stop))
        if binding is None:
            binding = self.runtime.io_binding()
            binding.bind_output(LOGITS)  # first: get_outputs()[0] is the logits
            for name, present, buffer in zip(self.graph.past_names, self.graph.present_names, self.buffers):
                value = ort.OrtValue.ortvalue_from_numpy(buffer[start:stop])
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(present, value)
                self._values.append(value)  # a bound view must outlive every run that uses it
            self._bindings[start, stop] = binding
        return binding

    def _run(
        self, start: int, stop: int, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """One run over slots [start, stop), their cache written in place; returns the logits
        (for one token a row, a view of a buffer the next such run overwrites)."""
        self._fit(mask.shape[1])
        binding = self._binding(start, stop)
        T = ids.shape[1]
        preallocated = T == 1 and self._logits is not None
        if preallocated:  # one token a row: into a buffer of ours, nothing to allocate or wrap
            if (start, stop) not in self._logits_bound:  # bound once, until a longer run rebinds
                value = self._logit_values.get((start, stop))
                if value is None:
                    value = self._logit_values[start, stop] = ort.OrtValue.ortvalue_from_numpy(self._logits[start:stop])
                binding.bind_ortvalue_output(LOGITS, value)
                self._logits_bound.add((start, stop))
        else:
            binding.bind_output(LOGITS)  # ORT allocates: the shape is the run's
            self._logits_bound.discard((start, stop))
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_cpu_input(ATTENTION_MASK, mask)
        if self.graph.has_position_ids:
            if positions is None:  # each row's T new tokens end its mask
                positions = (mask.sum(1, keepdims=True) - T) + np.arange(T, dtype=np.int64)
            binding.bind_cpu_input(POSITION_IDS, positions)
        self.runtime.run_binding(binding)
        if preallocated:
            return self._logits[start:stop]
        logits = binding.get_outputs()[0].numpy()
        if self._logits is None:  # now the vocabulary is known
            self._logits = np.zeros((len(self.owner), 1, logits.shape[-1]), logits.dtype)
        return logits

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> list[np.ndarray | TServeError]:
        """Into each sequence's own slot. The first chunks of prompts with no cache yet whose
        slots are adjacent run together, right-padded, in one run over those slots (ONNX
        Runtime's CPU GroupQueryAttention takes several new tokens at batch > 1 only with no
        past: a burst of 16 SmolLM-shaped 32-token prompts prefilled in 0.8 s rather than 1.28 s
        one by one, the same logits and cache, by hand); every other chunk runs alone. A
        batched run that fails is run again chunk by chunk, so a failure stays its chunk's."""
        results: list[np.ndarray | TServeError | None] = [None] * len(chunks)
        fresh = sorted((self.slot(seq), i) for i, (seq, _) in enumerate(chunks) if seq.prefilled == 0)
        groups, alone = [], [i for i, (seq, _) in enumerate(chunks) if seq.prefilled > 0]
        for slot, i in fresh:
            if groups and groups[-1][-1][0] == slot - 1:
                groups[-1].append((slot, i))
            else:
                groups.append([(slot, i)])
        for group in groups:
            if len(group) == 1:
                alone.append(group[0][1])
                continue
            members = [chunks[i] for _, i in group]
            try:
                for i, logits in zip((i for _, i in group), self._prefill_together(group[0][0], members)):
                    results[i] = logits
            except TServeError:
                alone.extend(i for _, i in group)
        for i, out in zip(sorted(alone), prefill_each([chunks[i] for i in sorted(alone)], self._prefill)):
            results[i] = out
        return results

    def _prefill_together(self, first: int, chunks: list[tuple[Sequence, int]]) -> list[np.ndarray]:
        """Fresh prompt chunks of the adjacent slots from `first`, in one run: the logits of each."""
        T = max(n for _, n in chunks)
        ids = np.zeros((len(chunks), T), np.int64)
        mask = np.zeros((len(chunks), T), np.int64)
        for row, (seq, n) in enumerate(chunks):
            ids[row, :n] = seq.prompt[:n]
            mask[row, :n] = 1
        self._fit(min(max(len(seq.prompt) + seq.max_new_tokens for seq, _ in chunks), self.graph.max_length))
        positions = np.broadcast_to(np.arange(T, dtype=np.int64), (len(chunks), T))
        logits = self._run(first, first + len(chunks), ids, mask, np.ascontiguousarray(positions))
        out = []
        for row, (seq, n) in enumerate(chunks):
            slot = first + row
            self.lengths[slot] = n
            if self.prefix_cache is not None:
                self.prefix_cache.insert(
                    seq.prompt[:n], lambda a, b, slot=slot: [buf[slot, :, a:b] for buf in self.buffers]
                )
            out.append(logits[row, :n])
        return out

    def _prefill(self, seq: Sequence, n: int) -> np.ndarray:
        slot = self.slot(seq)
        start = seq.prefilled
        # as wide as the sequence will need, at once: a long prompt would otherwise widen the
        # buffers at every half again of its chunks, each time beside the running rows
        self._fit(min(len(seq.prompt) + seq.max_new_tokens, self.graph.max_length))
        ids = np.array([seq.prompt[start : start + n]], np.int64)
        logits = self._run(slot, slot + 1, ids, np.ones((1, start + n), np.int64))
        self.lengths[slot] = start + n
        if self.prefix_cache is not None:  # keep the full blocks computed so far: a prompt beside it may use them
            self.prefix_cache.insert(
                seq.prompt[: start + n], lambda a, b: [buffer[slot, :, a:b] for buffer in self.buffers]
            )
        return logits[0]

    def restore(self, seq: Sequence) -> int:
        """Copy the kept blocks that start the prompt into a slot for `seq`: its columns [0, n)."""
        blocks = self.prefix_cache.lookup(seq.prompt) if self.prefix_cache is not None else []
        if not blocks:
            return 0
        slot = self.slot(seq)
        n = len(blocks) * self.prefix_cache.block_tokens
        self._fit(n)
        for buffer, columns in zip(self.buffers, concatenated(blocks)):
            buffer[slot, :, :n] = columns
        self.lengths[slot] = n
        return n

    def fork(self, src: Sequence, dst: Sequence) -> None:
        """A free slot for `dst`, holding a copy of `src`'s columns."""
        s, d = self.slot_of[src], self.slot(dst)
        n = int(self.lengths[s])
        for b in self.buffers:
            b[d, :, :n] = b[s, :, :n]
        self.lengths[d] = n

    def _mask(self, rows: np.ndarray) -> np.ndarray:
        lengths = self.lengths[rows] + 1
        if len(lengths) == 1:
            return np.ones((1, int(lengths[0])), np.int64)
        return (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)

    def decode(self) -> np.ndarray:
        """One token for every running row; the last logits [rows, vocab]. A finished row
        (static batching keeps it) recomputes its last column and does not grow."""
        rows = np.arange(self.rows)
        logits = self._run(0, self.rows, self.next_ids[: self.rows, None], self._mask(rows))
        if self.fill_holes:  # the engine compacts before every decode: no finished row is left
            self.lengths[: self.rows] += 1
        else:
            self.lengths[[r for r in range(self.rows) if not self.owner[r].finished]] += 1
        return logits[:, -1]

    def max_draft(self) -> int:
        """A row running alone may verify a draft, within the context."""
        if self.rows != 1 or not self.fill_holes:
            return 0
        return max(0, self.graph.max_length - int(self.lengths[0]) - 1)

    def verify(self, draft: list[int]) -> np.ndarray:
        """The one running row's next token and a draft of the tokens after it, in one run
        (ONNX Runtime's CPU GroupQueryAttention takes several new tokens over a cache only for a
        batch of one): the logits [1 + len(draft), vocab]. The row's length grows by its next
        token; `accept` adds the draft tokens kept (the others' columns are overwritten later)."""
        assert self.rows == 1, "a draft is verified for a row running alone"
        ids = np.array([[self.next_ids[0], *draft]], np.int64)
        logits = self._run(0, 1, ids, np.ones((1, int(self.lengths[0]) + ids.shape[1]), np.int64))
        self.lengths[0] += 1
        return logits[0]

    def accept(self, row: int, n: int) -> None:
        """Keep `n` more columns of a row that verified a draft."""
        self.lengths[row] += n

    def decode_apart(self) -> tuple[np.ndarray | None, dict[int, TServeError]]:
        """After a failed batched decode: each live row alone. Returns the logits of the rows
        that ran (zeros elsewhere; None if none ran) and why each other row failed."""
        logits, failed = None, {}
        for row, seq in enumerate(self.seqs):
            if seq.finished:
                continue
            try:
                out = self._run(row, row + 1, self.next_ids[row : row + 1, None], self._mask(np.array([row])))
            except TServeError as e:
                failed[row] = e
                continue
            if logits is None:
                logits = np.zeros((self.rows, out.shape[-1]), out.dtype)
            logits[row] = out[0, -1]
        ran = [r for r, s in enumerate(self.seqs) if not s.finished and r not in failed]
        self.lengths[ran] += 1
        return logits, failed

    # -- joins and leaves -------------------------------------------------------------------

    def _reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def _move_data(self, src: int, dst: int) -> None:
        """Exchange two slots' caches, copying only the columns each holds."""
        n_src, n_dst = int(self.lengths[src]), int(self.lengths[dst])
        for b in self.buffers:
            kept = b[dst, :, :n_dst].copy() if n_dst else None
            b[dst, :, :n_src] = b[src, :, :n_src]
            if kept is not None:
                b[src, :, :n_dst] = kept
        self.lengths[[src, dst]] = n_dst, n_src
        self.next_ids[[src, dst]] = self.next_ids[[dst, src]]

    def join(self, seq: Sequence, token: int) -> None:
        """Make a prefilled sequence the next running row, feeding `token` next."""
        self.next_ids[self._join_slot(seq)] = token

    def feed(self, row: int, token: int) -> None:
        self.next_ids[row] = token

    def finish(self, row: int) -> None:
        self.next_ids[row] = 0

    def compact(self) -> None:
        """Drop the finished rows whenever there are any (moving a few live rows is cheap here,
        unlike KVRows, which waits for sparseness): the live rows after the first `live` slots
        move into the holes before them, one sequence's columns each. Static batching keeps them."""
        if not self.fill_holes or self._drop_finished() is None:
            return
        if self.rows:  # an empty batch keeps its width: the next sequences would widen it again
            self._narrow_if_wide()
