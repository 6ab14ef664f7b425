"""Automatic prefix caching: the keys and values of prompt prefixes, kept after their sequences
end and restored into a later sequence whose prompt starts with the same tokens.

A prompt is cut into blocks of `block_tokens` tokens; only full blocks are kept. A block is
found by its key, (its parent block's id, its own tokens): the chain of keys from the prompt's
first block names exactly one prefix, as vLLM's block hashes do. The key is a dict key, not a
digest of one: the dict hashes it and then compares it whole, so two prefixes whose hashes
collide are never taken for each other (a digest alone can collide, and a crafted prompt could
make it: vLLM moved from Python's hash to SHA-256 for that reason). A parent id is never reused,
so a key names its prefix for as long as the block lives.

    block.columns[i]   [heads, block_tokens, head_dim]   past input i's keys or values, a copy

Blocks rather than a radix tree (SGLang): the caches here copy a prefix into a sequence's own
state rather than share pages, so a tree's token-granular matches would save at most
`block_tokens` - 1 tokens a request, at the cost of splitting nodes and slicing their arrays.

`lookup` gives the longest chain of blocks that starts the prompt, but never the whole prompt:
the last prompt token is always run, for the logits of the first generated token. `insert`
keeps the full blocks of a prompt that are not kept yet. Both touch the chain they walked, in
least-recently-used order, deepest block first: every parent is then more recent than each of
its children, so eviction (least recently used first, within `max_bytes`) takes a leaf, and a
block still reachable is never left without its parent (vLLM frees a sequence's blocks tail
first for the same reason).

One per cache (so per generating model version), used by the engine thread only.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

BLOCK_TOKENS = 16

Key = tuple[int, tuple[int, ...]]  # (parent block id, 0 for the first block; the block's tokens)


@dataclass(eq=False)
class Block:
    key: Key
    id: int
    parent: Block | None
    columns: list[np.ndarray]  # per past input [heads, block_tokens, head_dim]
    nbytes: int
    children: int = 0


@dataclass
class PrefixCache:
    max_bytes: int
    block_tokens: int = BLOCK_TOKENS
    nbytes: int = 0
    lookups: int = 0
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, the tokens found (restored instead of computed)
    evictions: int = 0  # blocks evicted
    _blocks: OrderedDict[Key, Block] = field(default_factory=OrderedDict)  # least recently used first
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self._blocks)

    def _key(self, prompt: list[int], parent: int, j: int) -> Key:
        B = self.block_tokens
        return parent, tuple(prompt[j * B : (j + 1) * B])

    def _walk(self, prompt: list[int], blocks: int) -> list[Block]:
        """The longest chain of kept blocks starting `prompt`, at most `blocks` long."""
        chain: list[Block] = []
        for j in range(blocks):
            block = self._blocks.get(self._key(prompt, chain[-1].id if chain else 0, j))
            if block is None:
                break
            chain.append(block)
        return chain

    def _touch(self, chain: list[Block]) -> None:
        """Most recently used, deepest first: each parent ends up more recent than its children."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def lookup(self, prompt: list[int]) -> list[Block]:
        """The kept blocks that start `prompt`, leaving at least its last token to run."""
        chain = self._walk(prompt, (len(prompt) - 1) // self.block_tokens)
        self._touch(chain)
        self.lookups += 1
        self.queried_tokens += len(prompt)
        self.hit_tokens += len(chain) * self.block_tokens
        return chain

    def insert(self, prompt: list[int], columns_of: Callable[[int, int], list[np.ndarray]]) -> int:
        """Keep the full blocks of `prompt` not kept yet: `columns_of(start, stop)` gives the
        prompt's columns [start, stop) of every past input ([heads, stop - start, head_dim] each;
        copied here). Stops at the first block that does not fit once every block outside this
        prompt's chain is evicted. Returns the blocks added."""
        full = len(prompt) // self.block_tokens
        chain = self._walk(prompt, full)
        self._touch(chain)  # most recent: the eviction below takes other prompts' blocks
        added = 0
        for j in range(len(chain), full):
            B = self.block_tokens
            columns = [np.array(c) for c in columns_of(j * B, (j + 1) * B)]
            size = sum(c.nbytes for c in columns)
            if not self._make_room(size, protected=len(chain)):
                break
            parent = chain[-1] if chain else None
            block = Block(self._key(prompt, parent.id if parent else 0, j), next(self._ids), parent, columns, size)
            if parent is not None:
                parent.children += 1
            self._blocks[block.key] = block
            self.nbytes += size
            chain.append(block)
            added += 1
        self._touch(chain)
        return added

    def _make_room(self, size: int, protected: int) -> bool:
        """Evict least recently used blocks until `size` more bytes fit; False if they cannot
        without evicting one of the `protected` most recent blocks (the chain being inserted)."""
        while self.nbytes + size > self.max_bytes:
            if len(self._blocks) <= protected:
                return False
            self._evict(next(iter(self._blocks.values())))
        return True

    def _evict(self, block: Block) -> None:
        del self._blocks[block.key]
        self.nbytes -= block.nbytes
        self.evictions += 1
        if block.parent is not None:
            block.parent.children -= 1


def concatenated(blocks: list[Block]) -> list[np.ndarray]:
    """A chain's columns as one array per past input: [heads, tokens, head_dim]."""
    return [np.concatenate(columns, axis=1) for columns in zip(*(b.columns for b in blocks))]
