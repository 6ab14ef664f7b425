"""Continuous batching for encoder-decoder generation (the Optimum seq2seq convention).

The decoder-only engine's thread, queue, cancellation, deadlines and event hand-off are reused
(GenerationEngine); the step is different, because each sequence carries two caches:

    schedule  end cancelled and expired rows; admit waiting sequences while there is room
    execute   joiners: one encoder run over their sources (right-padded), one decoder_model run
              from the decoder start token -> their first logits, self-attention caches (one
              column) and cross-attention caches (their source length)
              running rows: one decoder_with_past run
    update    sample and stream; finished rows leave the batch at once; joiners enter it

The running batch keeps self-attention caches left-padded to the longest target so far (with
decoder_attention_mask) and cross-attention caches right-padded to the longest source (with
encoder_attention_mask); padding columns nobody needs are cut after rows leave. A graph without
decoder_attention_mask (an Optimum export) decodes each group of rows with the same target
length in its own run, since it cannot mask padding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.conventions.seq2seq import Seq2SeqGraphs
from service.errors import TServeError
from service.generation.engine import EngineLimits, GenerationEngine
from service.generation.sampling import sample
from service.generation.sequence import FinishReason, Sequence
from service.runtime import OrtRuntime
from service.stats import StepStats


@dataclass
class Seq2SeqRows:
    """The running batch: one row per sequence, both caches padded to the batch's widths."""

    seqs: list[Sequence] = field(default_factory=list)
    next_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # real self-attention columns per row
    self_kv: list[np.ndarray] = field(default_factory=list)  # (B, H, P, D), left-padded
    decoder_mask: np.ndarray | None = None  # (B, P)
    cross_kv: list[np.ndarray] = field(default_factory=list)  # (B, H, S, D), right-padded
    encoder_mask: np.ndarray | None = None  # (B, S)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def live(self) -> int:
        return len(self.seqs)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.self_kv, *self.cross_kv))

    def clear(self) -> None:
        self.__init__()

    def join(self, seqs: list[Sequence], tokens: list[int], self_kv: list[np.ndarray], cross_kv: list[np.ndarray],
             encoder_mask: np.ndarray) -> None:
        if not self.seqs:
            self.seqs, self.next_ids, self.lengths = list(seqs), list(tokens), [1] * len(seqs)
            self.self_kv, self.cross_kv = list(self_kv), list(cross_kv)
            self.decoder_mask, self.encoder_mask = np.ones((len(seqs), 1), np.int64), encoder_mask
            return
        P, S = self.decoder_mask.shape[1], max(self.encoder_mask.shape[1], encoder_mask.shape[1])
        self.self_kv = [np.concatenate([a, _pad(b, 2, P, left=True)]) for a, b in zip(self.self_kv, self_kv)]
        self.cross_kv = [np.concatenate([_pad(a, 2, S), _pad(b, 2, S)]) for a, b in zip(self.cross_kv, cross_kv)]
        joiner_mask = np.zeros((len(seqs), P), np.int64)
        joiner_mask[:, -1] = 1
        self.decoder_mask = np.concatenate([self.decoder_mask, joiner_mask])
        self.encoder_mask = np.concatenate([_pad(self.encoder_mask, 1, S), _pad(encoder_mask, 1, S)])
        self.seqs += seqs
        self.next_ids += tokens
        self.lengths += [1] * len(seqs)

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay; padding columns no row needs any more are cut."""
        if not rows:
            self.clear()
            return
        self.seqs = [self.seqs[r] for r in rows]
        self.next_ids = [self.next_ids[r] for r in rows]
        self.lengths = [self.lengths[r] for r in rows]
        P, S = max(self.lengths), int(self.encoder_mask[rows].sum(1).max())
        self.self_kv = [a[rows][:, :, -P:] for a in self.self_kv]
        self.decoder_mask = self.decoder_mask[rows][:, -P:]
        self.cross_kv = [a[rows][:, :, :S] for a in self.cross_kv]
        self.encoder_mask = self.encoder_mask[rows][:, :S]


def _pad(a: np.ndarray, axis: int, width: int, left: bool = False) -> np.ndarray:
    extra = width - a.shape[axis]
    if extra <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (extra, 0) if left else (0, extra)
    return np.pad(a, pad)


class Seq2SeqEngine(GenerationEngine):
    def __init__(self, name: str, encoder: OrtRuntime, decoder: OrtRuntime, decoder_with_past: OrtRuntime,
                 graphs: Seq2SeqGraphs, decoder_start_token_id: int, pad_token_id: int,
                 limits: EngineLimits = EngineLimits(), on_step: Callable[[StepStats], None] | None = None) -> None:
        super().__init__(name, decoder_with_past, None, limits, on_step)
        self.encoder, self.decoder, self.with_past = encoder, decoder, decoder_with_past
        self.graphs = graphs
        self.start_token, self.pad_token = decoder_start_token_id, pad_token_id
        self.rows = Seq2SeqRows()
        self._decoder_outputs = ["logits", *graphs.self_names, *graphs.cross_names]
        self._with_past_outputs = ["logits", *graphs.self_names]

    def step(self) -> StepStats:
        stats, now = StepStats(), time.monotonic()
        joiners = self._schedule_rows(now, stats)
        decoded = self._decode(stats) if len(self.rows) else None
        first = self._start(joiners, stats) if joiners else None
        now = time.monotonic()
        if decoded is not None:
            self._take(decoded, now, stats)
        if first is not None:
            self._join(joiners, first, now, stats)
        return stats

    # -- schedule ---------------------------------------------------------------------------

    def _schedule_rows(self, now: float, stats: StepStats) -> list[Sequence]:
        with self._lock:
            expired = [s for s in self.waiting if s.expired(now)]
            for seq in expired:
                self.waiting.remove(seq)
        for seq in expired:
            self._expire(seq, now, stats)
        gone = [r for r, s in enumerate(self.rows.seqs) if not s.finished and s.expired(now)]
        for r in gone:
            self._expire(self.rows.seqs[r], now, stats)
        if gone:
            self.rows.keep([r for r in range(len(self.rows)) if r not in set(gone)])
        joiners = []
        if not (self.static and len(self.rows)):
            with self._lock:
                while self.waiting and len(self.rows) + len(joiners) < self.limits.max_sequences:
                    seq = self.waiting.popleft()
                    seq.admitted = now
                    joiners.append(seq)
        return joiners

    # -- execute ----------------------------------------------------------------------------

    def _start(self, joiners: list[Sequence], stats: StepStats) -> list[np.ndarray] | TServeError:
        """Encoder and first decoder pass for the joiners, batched (sources right-padded)."""
        width = max(len(s.prompt) for s in joiners)
        ids = np.full((len(joiners), width), self.pad_token, np.int64)
        mask = np.zeros((len(joiners), width), np.int64)
        for i, s in enumerate(joiners):
            ids[i, :len(s.prompt)], mask[i, :len(s.prompt)] = s.prompt, 1
        stats.prefill_tokens += int(mask.sum())
        try:
            hidden = self.encoder.run_sync({"input_ids": ids, "attention_mask": mask}, ["last_hidden_state"])[0]
            out = self.decoder.run_sync({"input_ids": np.full((len(joiners), 1), self.start_token, np.int64),
                                         "encoder_hidden_states": hidden, "encoder_attention_mask": mask},
                                        self._decoder_outputs)
        except TServeError as e:
            return e
        return [*out, mask]

    def _decode(self, stats: StepStats) -> list[np.ndarray] | TServeError:
        rows, g = self.rows, self.graphs
        stats.decode_rows = len(rows)
        ids = np.array(rows.next_ids, np.int64)[:, None]
        mask = np.concatenate([rows.decoder_mask, np.ones((len(rows), 1), np.int64)], axis=1)
        try:
            if g.decoder_mask:
                return self.with_past.run_sync(
                    g.with_past_feeds(ids, rows.encoder_mask, mask, rows.self_kv, rows.cross_kv),
                    self._with_past_outputs)
            return self._decode_by_length(ids, mask)
        except TServeError as e:
            return e

    def _decode_by_length(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """Without decoder_attention_mask: one run per group of rows with the same target length,
        on their unpadded columns; assembled into the batch's (left-padded) shapes."""
        rows, g = self.rows, self.graphs
        P = mask.shape[1]
        logits, presents = None, [np.zeros(a.shape[:2] + (P,) + a.shape[3:], a.dtype) for a in rows.self_kv]
        for length in sorted(set(rows.lengths)):
            group = [r for r, n in enumerate(rows.lengths) if n == length]
            S = int(rows.encoder_mask[group].sum(1).max())
            out = self.with_past.run_sync(
                g.with_past_feeds(ids[group], rows.encoder_mask[group][:, :S], mask[group][:, -(length + 1):],
                                  [a[group][:, :, -length:] for a in rows.self_kv],
                                  [a[group][:, :, :S] for a in rows.cross_kv]),
                self._with_past_outputs)
            if logits is None:
                logits = np.zeros((len(rows),) + out[0].shape[1:], out[0].dtype)
            logits[group] = out[0]
            for full, part in zip(presents, out[1:]):
                full[group, :, -(length + 1):] = part
        return [logits, *presents]

    # -- update -----------------------------------------------------------------------------

    def _take(self, out: list[np.ndarray] | TServeError, now: float, stats: StepStats) -> None:
        rows = self.rows
        if isinstance(out, TServeError):
            self._end_running(out, stats)
            return
        rows.self_kv = out[1:]
        rows.decoder_mask = np.concatenate([rows.decoder_mask, np.ones((len(rows), 1), np.int64)], axis=1)
        rows.lengths = [n + 1 for n in rows.lengths]
        logits = out[0][:, -1]
        keep = []
        for r, seq in enumerate(rows.seqs):
            if seq.finished:  # static batching only: done, still computed until the batch ends
                keep.append(r)
                continue
            token = sample(seq.ban_early_eos(logits[r]), seq.params, seq.rng)
            rows.next_ids[r] = token
            if not self._emit(seq, token, now, stats) or self.static:
                keep.append(r)
        if self.static and all(s.finished for s in rows.seqs):
            keep = []
        if len(keep) < len(rows):
            rows.keep(keep)

    def _join(self, joiners: list[Sequence], out: list[np.ndarray] | TServeError, now: float,
              stats: StepStats) -> None:
        if isinstance(out, TServeError):
            for seq in joiners:
                self._end(seq, FinishReason.ERROR, now, stats, error=out)
            return
        n = self.graphs.n_layer * 2
        logits, self_kv, cross_kv, mask = out[0], out[1:1 + n], out[1 + n:1 + 2 * n], out[-1]
        stay, tokens = [], []
        for i, seq in enumerate(joiners):
            if seq.finished:  # cancelled while its first pass ran
                continue
            token = sample(seq.ban_early_eos(logits[i, -1]), seq.params, seq.rng)
            if not self._emit(seq, token, now, stats):
                stay.append(i)
                tokens.append(token)
        if stay:
            self.rows.join([joiners[i] for i in stay], tokens, [a[stay] for a in self_kv],
                           [a[stay] for a in cross_kv], mask[stay])
