"""What the generation engine needs of a KV cache: the one interface every cache implements.

The engine (generation/engine.py) schedules, chooses tokens and finishes sequences; a cache
owns the graphs it runs and everything per row: the keys and values, masks, positions, the
token each row feeds next, and any per-sequence state while a prompt is being prefilled. The
engine never asks which cache it has.

    KVRows        generation/kv_rows.py     decoder-with-past graphs: numpy arrays, rows
                                            left-padded to a common past, finished rows holes
    KVSlots       generation/kv_slots.py    graphs that read each row's length from its mask
                                            (GroupQueryAttention): one shared buffer, IO binding
    Seq2SeqCache  generation/seq2seq_cache.py  encoder-decoders: the encoder and first decoder
                                            pass as the prefill, cross-attention caches in
                                            preallocated slots, self-attention caches left-padded

The life of a sequence in a cache: `prefill` (one or more prompt chunks, into state of its own;
or `fork`, a copy of another's, for the other choices of an n > 1 request), then `join` with
the first chosen token (it becomes the last running row), `decode` once a step with the others
(or `verify` with a draft), `finish` when it ends (its row becomes a hole), gone at the next
`compact`. A sequence that ends before joining is `release`d.

Prefix caching (generation/prefix_cache.py): a decoder cache built with a prefix cache keeps
the keys and values of every prompt's full blocks once its last chunk is prefilled, and
`restore` copies the longest kept prefix of a newly admitted sequence's prompt into the
sequence's own prefill state (never the whole prompt: its last token still runs, for the
logits). The engine sets `seq.prefilled` to the tokens restored, so the prompt's chunks start
there, and asks for no restore where every prompt position's logits are wanted (prompt
logprobs) or where the state is a sibling's copy. KVSlots restores into the sequence's slot,
KVRows into its own past; the values restored are the ones the prompt's own run would have
computed (a token's keys and values depend on the tokens before it only), so the output is
the same. Seq2SeqCache has none: its decoder's prompt is the start token alone, and every
decoder key and value depends, through cross-attention, on that request's encoded source,
while the encoder is bidirectional (each source token's states depend on the whole source),
so no prefix of either is the same for two requests that are not wholly the same.

A cache's failures are TServeErrors raised from the run that failed; the engine attributes
them: a prompt chunk to its sequence, a batched decode by `decode_apart`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from service.errors import TServeError
from service.generation.prefix_cache import PrefixCache
from service.generation.sequence import Sequence


class KVCache(Protocol):
    # whether a prompt may be prefilled a chunk a step (an encoder reads its source whole)
    chunked_prefill: bool
    # the kept prompt blocks (None: no prefix caching, off or not applicable)
    prefix_cache: PrefixCache | None

    @property
    def seqs(self) -> list[Sequence]:
        """The running rows' sequences, row by row (finished rows included until `compact`)."""

    @property
    def live(self) -> int:
        """Running rows whose sequence has not finished."""

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held: running rows and sequences being prefilled."""

    def __len__(self) -> int:
        """Running rows, holes included."""

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> list[np.ndarray | TServeError]:
        """Run each sequence's next `n` prompt tokens into its own state (not yet a row): for each
        chunk, the logits of its positions [n', vocab] (the last row: the distribution of the
        token after the chunk), or the error that chunk's run raised. The caller advances
        `seq.prefilled`. A cache may run several chunks in one run; one chunk's failure must not
        fail the others."""

    def restore(self, seq: Sequence) -> int:
        """Give a sequence about to be prefilled (no state here yet) the kept prefix of its prompt
        as its own prefill state: the tokens restored, fewer than its prompt (0: none kept, or no
        prefix cache). Its later `prefill` chunks start there."""

    def fork(self, src: Sequence, dst: Sequence) -> None:
        """Give `dst` (a sequence with no state here) a copy of fully prefilled `src`'s state, as
        if `dst` had been prefilled itself: n > 1 choices prefill their prompt once."""

    def join(self, seq: Sequence, token: int) -> None:
        """Make a fully prefilled sequence the last running row, feeding `token` next."""

    def release(self, seq: Sequence) -> None:
        """Drop the state of a sequence that ended before it joined (no-op if it has none)."""

    def decode(self) -> np.ndarray:
        """One token for every running row: the logits [rows, vocab] (a view the next run may
        overwrite). Raises if the run fails; the cache is then unchanged."""

    def decode_apart(self) -> tuple[np.ndarray | None, dict[int, TServeError]]:
        """After a failed `decode`: each live row alone. The logits of the rows that ran (zeros
        elsewhere; None if none did, the cache unchanged) and why each other row failed."""

    def max_draft(self) -> int:
        """How many draft tokens `verify` can check now (0: it cannot)."""

    def verify(self, draft: list[int]) -> np.ndarray:
        """The one running row's next token and `draft` after it, in one run: the logits
        [1 + len(draft), vocab]. The row grows by its next token; `accept` keeps draft tokens."""

    def accept(self, row: int, n: int) -> None:
        """Keep `n` draft tokens of a row that verified a draft."""

    def feed(self, row: int, token: int) -> None:
        """The token `row` feeds to the next decode."""

    def finish(self, row: int) -> None:
        """The row's sequence ended: the row stays until `compact`, its output ignored, and never
        again feeds a token that made a run fail."""

    def compact(self) -> None:
        """Drop finished rows when it pays (each cache has its own rule); static batching's caches
        keep them until `clear`."""

    def clear(self) -> None:
        """Drop every running row (their sequences have ended); prefilling state stays."""


MIN_PADDING_EFFICIENCY = 0.8  # a batched prompt run's real tokens / its padded tokens, at least


def length_groups(lengths: list[int], min_efficiency: float = MIN_PADDING_EFFICIENCY) -> list[list[int]]:
    """Indices grouped for batched runs, shortest first: a group takes the next longer one while
    its real tokens stay at least `min_efficiency` of its padded ones."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (real + lengths[i]) >= min_efficiency * (len(groups[-1]) + 1) * lengths[i]:
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def prefill_each(
    chunks: list[tuple[Sequence, int]], run: Callable[[Sequence, int], np.ndarray]
) -> list[np.ndarray | TServeError]:
    """`prefill` for a cache that runs each chunk on its own: one failure stays its chunk's."""
    results: list[np.ndarray | TServeError] = []
    for seq, n in chunks:
        try:
            results.append(run(seq, n))
        except TServeError as e:
            results.append(e)
    return results
