"""The running batch's caches for encoder-decoder generation (the Optimum seq2seq convention,
conventions/seq2seq.py): the engine's KVCache (generation/cache.py) for a model of three graphs.

    prefill   a sequence's whole source (an encoder reads it at once): the encoder and the first
              decoder pass from the decoder start token, batched over the step's joiners (sorted
              by length and grouped so padding stays under a fifth of each run), giving the
              first token's logits, one self-attention column and the cross-attention caches
    decode    one decoder_with_past run for the running rows

    cross[i]   [slots, heads, width, head_dim]  per cross-attention input, preallocated: slot s
                                                holds one sequence's, right-padded to `width`
    encoder_mask [slots, width]                 1 over each slot's source
    self_kv[i] [rows, heads, P, head_dim]       the running rows' self-attention caches, left-
                                                padded to the longest target so far (what the
                                                last run returned: no copy between steps)
    lengths    [slots]                          self-attention columns per row

The running rows are slots 0..rows-1, so a decode feeds the cross buffers' leading rows as
they are (a view, no copy). A joiner's cross caches are written once, into a free slot, when its
source is encoded; it moves down to the first free running row when it joins, and finished rows
are dropped at every step, later live rows moving into their slots (one sequence's caches
copied, never the batch's). The cross buffers widen for a longer source (by half again, in
multiples of 32 columns, up to the model's longest) and narrow when the long sources leave
(an emptied batch too: a decode attends over the whole width).

A decoder_with_past graph without decoder_attention_mask (an Optimum export) cannot mask
left padding: each group of rows with the same target length decodes in a run of its own.
"""

from __future__ import annotations

import numpy as np

from service.conventions.seq2seq import Seq2SeqGraphs
from service.errors import TServeError
from service.generation.cache import length_groups
from service.generation.sequence import Sequence
from service.generation.slots import SlotTable

WIDTH_STEP = 32  # cross buffer widths are multiples of this many columns


def _width(columns: int, max_width: int) -> int:
    return (
        min(max_width, -(-columns // WIDTH_STEP) * WIDTH_STEP) if max_width else -(-columns // WIDTH_STEP) * WIDTH_STEP
    )


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    extra = width - a.shape[2]
    return a if extra <= 0 else np.pad(a, [(0, 0), (0, 0), (extra, 0), (0, 0)])


class Seq2SeqCache(SlotTable):
    chunked_prefill = False
    # no prefix caching (generation/cache.py says why): every cached value depends on the source whole
    prefix_cache = None

    def __init__(
        self,
        graphs: Seq2SeqGraphs,
        encoder,
        decoder,
        with_past,
        decoder_start_token_id: int,
        pad_token_id: int,
        slots: int,
        max_source: int = 0,
        fill_holes: bool = True,
    ) -> None:
        self.graphs = graphs
        self.encoder, self.decoder, self.with_past = encoder, decoder, with_past
        self.start_token, self.pad_token = decoder_start_token_id, pad_token_id
        self.max_source = max_source  # the widest a cross buffer grows (0: unbounded)
        # static batching (a benchmark baseline) keeps finished rows computing until all end
        self.fill_holes = fill_holes
        self._decoder_outputs = ["logits", *graphs.self_names, *graphs.cross_names]
        self._with_past_outputs = ["logits", *graphs.self_names]
        self.source_len = np.zeros(slots, np.int64)
        self.lengths = np.zeros(slots, np.int64)
        self.next_ids = np.zeros(slots, np.int64)
        self.cross: list[np.ndarray] = []  # allocated at the first encoder run (its heads and dims)
        self.encoder_mask = np.zeros((slots, 0), np.int64)
        self._first_self: dict[Sequence, list[np.ndarray]] = {}  # a prefilled sequence's first column
        self.self_kv: list[np.ndarray] = []
        super().__init__(slots)

    # -- the KVCache interface ---------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.encoder_mask.shape[1]

    @property
    def cross_column_bytes(self) -> int:
        """One source token's cross-attention keys and values, every layer (known after the first
        encoder run)."""
        return sum(a.shape[1] * a.shape[3] * a.itemsize for a in self.cross)

    @property
    def nbytes(self) -> int:
        cross = int(self.source_len.sum()) * self.cross_column_bytes
        own = sum(a.nbytes for first in self._first_self.values() for a in first)
        return cross + own + sum(a.nbytes for a in self.self_kv)

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> list[np.ndarray | TServeError]:
        """Each sequence's whole source (`n` is all of it), in runs grouped by length; a failed
        group is re-run a sequence at a time, so only the culprit fails."""
        results: list[np.ndarray | TServeError | None] = [None] * len(chunks)
        for group in length_groups([len(seq.prompt) for seq, _ in chunks]):
            seqs = [chunks[i][0] for i in group]
            try:
                logits = self._start(seqs)
            except TServeError:
                for i, seq in zip(group, seqs):
                    try:
                        results[i] = self._start([seq])[0]
                    except TServeError as e:
                        results[i] = e
                continue
            for i, row in zip(group, logits):
                results[i] = row
        return results

    def _start(self, seqs: list[Sequence]) -> list[np.ndarray]:
        """Encoder and first decoder pass for these sources, right-padded into one run; their
        caches go into slots of their own. Returns each one's first logits [1, vocab]."""
        width = max(len(s.prompt) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_token, np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s.prompt)], mask[i, : len(s.prompt)] = s.prompt, 1
        hidden = self.encoder.run_sync({"input_ids": ids, "attention_mask": mask}, ["last_hidden_state"])[0]
        out = self.decoder.run_sync(
            {
                "input_ids": np.full((len(seqs), 1), self.start_token, np.int64),
                "encoder_hidden_states": hidden,
                "encoder_attention_mask": mask,
            },
            self._decoder_outputs,
        )
        n = 2 * self.graphs.n_layer
        logits, first_self, cross = out[0], out[1 : 1 + n], out[1 + n : 1 + 2 * n]
        if not self.cross:
            self.cross = [np.zeros((len(self.owner), a.shape[1], 0, a.shape[3]), a.dtype) for a in cross]
        self._fit(width)
        for i, seq in enumerate(seqs):
            slot = self.slot(seq)
            L = len(seq.prompt)
            for buffer, own in zip(self.cross, cross):
                buffer[slot, :, :L] = own[i, :, :L]
                buffer[slot, :, L:] = 0
            self.encoder_mask[slot] = 0
            self.encoder_mask[slot, :L] = 1
            self.source_len[slot] = L
            self._first_self[seq] = [a[i : i + 1] for a in first_self]
        return [logits[i, -1:] for i in range(len(seqs))]

    def join(self, seq: Sequence, token: int) -> None:
        first = self._first_self.pop(seq)
        row = self._join_slot(seq)
        self.self_kv = (
            [np.concatenate([a, _left_pad(own, a.shape[2])]) for a, own in zip(self.self_kv, first)] if row else first
        )
        self.lengths[row] = 1
        self.next_ids[row] = token

    def restore(self, seq: Sequence) -> int:
        return 0

    def release(self, seq: Sequence) -> None:
        self._first_self.pop(seq, None)
        super().release(seq)

    def fork(self, src: Sequence, dst: Sequence) -> None:
        """A free slot for `dst`, holding a copy of `src`'s cross caches; its first pass's self-attention too."""
        s, d = self.slot_of[src], self.slot(dst)
        L = int(self.source_len[s])
        for b in self.cross:
            b[d, :, :L] = b[s, :, :L]
            b[d, :, L:] = 0
        self.encoder_mask[d] = self.encoder_mask[s]
        self.source_len[d] = L
        self._first_self[dst] = [a.copy() for a in self._first_self[src]]

    def decode(self) -> np.ndarray:
        rows = self.rows
        ids = self.next_ids[:rows, None]
        if self.graphs.decoder_mask:
            out = self.with_past.run_sync(
                self._feeds(slice(0, rows), ids, self._decoder_mask(self.lengths[:rows])), self._with_past_outputs
            )
            logits, presents = out[0][:, -1], out[1:]
        else:
            logits, presents = self._decode_by_length(ids)
        self.self_kv = presents
        self.lengths[:rows] += 1
        return logits

    def _decode_by_length(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Without decoder_attention_mask: one run per group of rows with the same target length,
        on their unpadded columns; assembled into the batch's (left-padded) shapes."""
        rows, P = self.rows, self.self_kv[0].shape[2]
        lengths = self.lengths[:rows]
        logits, presents = None, [np.zeros(a.shape[:2] + (P + 1,) + a.shape[3:], a.dtype) for a in self.self_kv]
        for length in sorted(set(lengths.tolist())):
            group = np.flatnonzero(lengths == length)
            out = self.with_past.run_sync(
                self._feeds(group, ids[group], np.ones((len(group), length + 1), np.int64), length),
                self._with_past_outputs,
            )
            if logits is None:
                logits = np.zeros((rows, out[0].shape[-1]), out[0].dtype)
            logits[group] = out[0][:, -1]
            for full, part in zip(presents, out[1:]):
                full[group, :, -(length + 1) :] = part
        return logits, presents

    def _feeds(
        self, rows: slice | np.ndarray, ids: np.ndarray, decoder_mask: np.ndarray, columns: int | None = None
    ) -> dict[str, np.ndarray]:
        """decoder_with_past's inputs for these rows: their last `columns` self-attention
        columns (all of them by default) and their cross caches."""
        self_kv = [a[rows] for a in self.self_kv]
        if columns is not None:
            self_kv = [a[:, :, a.shape[2] - columns :] for a in self_kv]
        return self.graphs.with_past_feeds(
            ids, self.encoder_mask[rows], decoder_mask, self_kv, [a[rows] for a in self.cross]
        )

    def _decoder_mask(self, lengths: np.ndarray) -> np.ndarray:
        """[rows, P + 1]: 1 over each row's columns and its new token (rows are left-padded)."""
        P = self.self_kv[0].shape[2]
        return (np.arange(P + 1)[None] >= (P - lengths)[:, None]).astype(np.int64)

    def decode_apart(self) -> tuple[np.ndarray | None, dict[int, TServeError]]:
        rows, P = self.rows, self.self_kv[0].shape[2]
        logits, failed, ran = None, {}, []
        presents = [np.zeros(a.shape[:2] + (P + 1,) + a.shape[3:], a.dtype) for a in self.self_kv]
        for row, seq in enumerate(self.seqs):
            if seq.finished:
                continue
            length = int(self.lengths[row])
            one = slice(row, row + 1)
            try:
                out = self.with_past.run_sync(
                    self._feeds(one, self.next_ids[one, None], np.ones((1, length + 1), np.int64), length),
                    self._with_past_outputs,
                )
            except TServeError as e:
                failed[row] = e
                continue
            if logits is None:
                logits = np.zeros((rows, out[0].shape[-1]), out[0].dtype)
            logits[row] = out[0][0, -1]
            for full, part in zip(presents, out[1:]):
                full[row, :, -(length + 1) :] = part[0]
            ran.append(row)
        if logits is None:
            return None, failed
        self.self_kv = presents
        self.lengths[ran] += 1
        return logits, failed

    def max_draft(self) -> int:
        return 0  # drafts are checked on a decoder's shared buffer only

    def verify(self, draft: list[int]) -> np.ndarray:
        raise NotImplementedError("Seq2SeqCache verifies no drafts (max_draft is 0)")

    def accept(self, row: int, n: int) -> None:
        raise NotImplementedError("Seq2SeqCache verifies no drafts (max_draft is 0)")

    def feed(self, row: int, token: int) -> None:
        self.next_ids[row] = token

    def finish(self, row: int) -> None:
        self.next_ids[row] = self.pad_token

    def compact(self) -> None:
        """Drop the finished rows at once (static batching keeps them): later live rows move into
        their slots, and self-attention columns no row needs any more are cut."""
        if not self.fill_holes:
            return
        moves = self._drop_finished()
        if moves is None:
            return
        for src, dst in moves:  # the self-attention rows, which are not slot data
            for a in self.self_kv:
                a[dst] = a[src]
        live = self.rows
        if live:
            P = int(self.lengths[:live].max())
            self.self_kv = [np.ascontiguousarray(a[:live, :, a.shape[2] - P :]) for a in self.self_kv]
        else:
            self.self_kv = []
        # emptied too: every decode attends over the whole width, so one long source must not
        # leave the short ones after it paying for its columns
        self._narrow_if_wide()

    def clear(self) -> None:
        self._clear_rows()
        self.self_kv = []

    # -- slots --------------------------------------------------------------------------------

    def _reset(self, slot: int) -> None:
        self.source_len[slot] = self.lengths[slot] = 0
        self.encoder_mask[slot] = 0

    def _move_data(self, src: int, dst: int) -> None:
        """Exchange two slots' cross caches, mask and lengths (the self-attention rows are the
        caller's)."""
        n_src, n_dst = int(self.source_len[src]), int(self.source_len[dst])
        for b in self.cross:
            kept = b[dst, :, :n_dst].copy() if n_dst else None
            b[dst, :, :n_src] = b[src, :, :n_src]
            b[dst, :, n_src:] = 0
            if kept is not None:
                b[src, :, :n_dst] = kept
                b[src, :, n_dst:] = 0
        for a in (self.encoder_mask, self.source_len, self.lengths, self.next_ids):
            a[[src, dst]] = a[[dst, src]]

    def _resize(self, width: int) -> None:
        keep = min(width, self.width)
        self.cross = [
            np.concatenate([a[:, :, :keep], np.zeros(a.shape[:2] + (width - keep,) + a.shape[3:], a.dtype)], 2)
            for a in self.cross
        ]
        self.encoder_mask = np.concatenate(
            [self.encoder_mask[:, :keep], np.zeros((len(self.owner), width - keep), np.int64)], 1
        )

    def _fit(self, columns: int) -> None:
        if columns > self.width:
            self._resize(_width(max(columns, self.width * 3 // 2), self.max_source))

    def _narrow_if_wide(self) -> None:
        target = _width(max(WIDTH_STEP, int(self.source_len.max())), self.max_source)
        if target * 2 <= self.width:
            self._resize(target)
