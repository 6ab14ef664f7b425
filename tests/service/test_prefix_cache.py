"""The prefix cache's own rules, in-process with hand-made columns: the longest kept prefix and
never the whole prompt, a block's columns travel whole, least-recently-used eviction within the
byte bound, leaf first, and the counters. (Restoring into a real cache, with the same output,
is the engine tests'.)"""

from __future__ import annotations

import numpy as np
import pytest

from service.generation.prefix_cache import PrefixCache, concatenated

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

HEADS, HEAD_DIM, INPUTS = 2, 3, 4
B = 4  # tokens a block, small for readable prompts
BLOCK_BYTES = INPUTS * HEADS * B * HEAD_DIM * 4  # float32


def columns_of(prompt: list[int]):
    """A prompt's cache as a prefill would leave it: position p of input i holds 1000 i + prompt[p]."""
    tokens = np.array(prompt, np.float32)
    full = [np.broadcast_to((1000 * i + tokens)[None, :, None], (HEADS, len(prompt), HEAD_DIM)) for i in range(INPUTS)]
    calls = []

    def columns(start: int, stop: int) -> list[np.ndarray]:
        calls.append((start, stop))
        return [c[:, start:stop] for c in full]

    columns.calls = calls
    return columns


def cache(blocks: int = 100) -> PrefixCache:
    return PrefixCache(blocks * BLOCK_BYTES, block_tokens=B)


def keep(pc: PrefixCache, prompt: list[int]) -> int:
    return pc.insert(prompt, columns_of(prompt))


def restored(blocks) -> np.ndarray:
    """The tokens a chain's columns say they hold, checked on every input, head and dim."""
    arrays = concatenated(blocks)
    for i, a in enumerate(arrays):
        assert a.shape == (HEADS, len(blocks) * B, HEAD_DIM) and np.all(a == a[:1, :, :1])
        assert np.array_equal(a[0, :, 0] - 1000 * i, arrays[0][0, :, 0])
    return arrays[0][0, :, 0].astype(int) if arrays else np.zeros(0, int)


def test_lookup_finds_the_longest_kept_prefix_and_never_the_whole_prompt():
    pc = cache()
    first = list(range(10, 21))  # 11 tokens: two full blocks kept, the rest is no block
    assert keep(pc, first) == 2 and len(pc) == 2 and pc.nbytes == 2 * BLOCK_BYTES
    assert restored(pc.lookup([*first[:8], 99, 98])).tolist() == first[:8]  # both blocks
    assert restored(pc.lookup([*first[:6], 99, 98, 97])).tolist() == first[:4]  # the second differs
    assert pc.lookup([99, *first[1:]]) == []  # the first block differs: nothing after it counts
    assert restored(pc.lookup(first[:9])).tolist() == first[:8]
    assert restored(pc.lookup(first[:8])).tolist() == first[:4]  # 8 tokens: the last one must run
    assert pc.lookup(first[:4]) == [] and pc.lookup(first[:1]) == []


def test_a_block_is_its_whole_prefix_not_its_own_tokens():
    """The same four tokens after a different first block are another block."""
    pc = cache()
    keep(pc, [1, 2, 3, 4, 5, 6, 7, 8])
    assert restored(pc.lookup([9, 9, 9, 9, 5, 6, 7, 8, 0])).tolist() == []
    assert keep(pc, [9, 9, 9, 9, 5, 6, 7, 8]) == 2 and len(pc) == 4
    assert restored(pc.lookup([9, 9, 9, 9, 5, 6, 7, 8, 0])).tolist() == [9, 9, 9, 9, 5, 6, 7, 8]


def test_insert_copies_only_the_blocks_not_kept_yet():
    pc = cache()
    keep(pc, list(range(8)))
    longer = list(range(14))
    columns = columns_of(longer)
    assert pc.insert(longer, columns) == 1 and columns.calls == [(8, 12)]
    assert keep(pc, longer) == 0 and len(pc) == 3


def test_kept_columns_are_copies():
    pc = cache()
    prompt = list(range(5))
    live = [np.zeros((HEADS, 5, HEAD_DIM), np.float32) for _ in range(INPUTS)]
    pc.insert(prompt, lambda a, b: [c[:, a:b] for c in live])
    for c in live:
        c[:] = 7  # the sequence's cache goes on (or its slot is reused)
    assert np.all(concatenated(pc.lookup(prompt))[0] == 0)


def test_eviction_is_least_recently_used_within_the_bound_and_leaf_first():
    pc = cache(blocks=4)
    a, b = [1] * 4 + [2] * 4 + [3] * 4, [5] * 4 + [6] * 4
    keep(pc, a)  # blocks a1 <- a2 <- a3
    keep(pc, b)  # b1 <- b2: five blocks do not fit in four
    assert len(pc) == 4 and pc.nbytes == 4 * BLOCK_BYTES and pc.evictions == 1
    assert restored(pc.lookup([*a, 0])).tolist() == a[:8]  # a's leaf went first, its parents stay
    assert restored(pc.lookup([*b, 0])).tolist() == b
    # a was touched before b: its chain is older; a longer b takes a's blocks, deepest first
    assert keep(pc, [*b, 7, 7, 7, 7]) == 1 and pc.evictions == 2
    assert restored(pc.lookup([*a, 0])).tolist() == a[:4]
    keep(pc, [*b, 7, 7, 7, 7, 8, 8, 8, 8])
    assert pc.lookup([*a, 0]) == [] and pc.evictions == 3 and len(pc) == 4
    for block in pc._blocks.values():  # nothing reachable lost its parent
        assert block.parent is None or block.parent.key in pc._blocks
        assert block.children == sum(other.parent is block for other in pc._blocks.values())


def test_touching_a_shared_parent_keeps_it_behind_its_children():
    """Two prompts share a first block; whichever chain is used, the parent is the more
    recently used, so it is evicted after both children."""
    pc = cache(blocks=3)
    keep(pc, [1] * 4 + [2] * 4)
    keep(pc, [1] * 4 + [3] * 4)
    pc.lookup([1] * 4 + [2] * 4 + [0])
    keep(pc, [9] * 4)  # evicts the least recently used: the [3] child, not the shared parent
    assert restored(pc.lookup([1] * 4 + [3] * 4 + [0])).tolist() == [1] * 4
    keep(pc, [8] * 4)  # then the [2] child
    assert restored(pc.lookup([1] * 4 + [2] * 4 + [0])).tolist() == [1] * 4
    assert pc.evictions == 2


def test_a_prompt_that_cannot_fit_keeps_what_fits_and_never_evicts_its_own_chain():
    pc = cache(blocks=2)
    keep(pc, [4] * 4)
    assert keep(pc, list(range(16))) == 2 and len(pc) == 2  # [4] went; the third and fourth blocks do not fit
    assert restored(pc.lookup([*range(16), 0])).tolist() == list(range(8))
    assert PrefixCache(BLOCK_BYTES - 1, block_tokens=B).insert(list(range(8)), columns_of(list(range(8)))) == 0


def test_counters():
    pc = cache()
    keep(pc, list(range(12)))
    pc.lookup([*range(9), 50])  # 10 tokens looked up, 8 found
    pc.lookup([50] * 5)  # 5 looked up, none found
    assert (pc.lookups, pc.queried_tokens, pc.hit_tokens, pc.evictions) == (2, 15, 8, 0)
    assert pc.nbytes == 3 * BLOCK_BYTES
