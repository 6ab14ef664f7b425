"""Prompt-lookup speculative decoding: drafts from the sequence's own tokens, checked by the model.

A greedy sequence often repeats itself or its prompt (code, quotes, lists, a small model's
loops). The draft is what followed the latest earlier occurrence of the sequence's last n
tokens (the longest n up to `max_ngram` that occurred before), copied on as far as asked, the
copy running into its own output when the match is recent (LZ77's overlapping copy). The engine
runs the row's next token and the draft through the model in one run and keeps the draft's
tokens up to the first one greedy decoding would not have chosen, plus greedy's own token
there: the output is what one-at-a-time greedy decoding gives (within float rounding: the run
over several tokens sums in another order, which could only flip a near-tie), in fewer runs when
drafts are right. (vLLM's "ngram" method and TGI's `--speculate` do the same.)

The draft's length adapts to how often drafts are right (transformers' "heuristic" schedule for
assisted generation): two tokens longer after a draft kept whole, one shorter after a miss, so
text that does not repeat itself costs runs of about two tokens, not `max_draft` + 1.

The index maps each n-gram to where the token after its latest occurrence sits; it catches up
with the sequence's tokens when asked for a draft, O(max_ngram) per new token.
"""

from __future__ import annotations


class PromptLookup:
    def __init__(self, max_ngram: int = 3, max_draft: int = 8) -> None:
        self.max_ngram = max_ngram
        self.max_draft = self.draft_len = max_draft  # the next draft's length, adapted
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence

    def extend(self, tokens: list[int]) -> None:
        ctx = self.tokens
        for token in tokens:
            ctx.append(token)
            end = len(ctx) - 1  # `token` follows the n-grams ending just before it
            for n in range(1, min(self.max_ngram, end) + 1):
                self._after[tuple(ctx[end - n : end])] = end

    def sync(self, prompt: list[int], generated: list[int]) -> None:
        """Index the sequence's tokens not indexed yet (its prompt, then what it generated)."""
        have = len(self.tokens)
        if have < len(prompt):
            self.extend(prompt[have:])
            have = len(prompt)
        self.extend(generated[have - len(prompt) :])

    def update(self, drafted: int, kept: int) -> None:
        """After a verified draft: lengthen the next after a whole one kept, shorten it after a miss."""
        if kept == drafted:
            self.draft_len = min(self.max_draft, self.draft_len + 2)
        else:
            self.draft_len = max(1, self.draft_len - 1)

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens predicted to follow, [] when the last tokens never occurred before."""
        ctx = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(ctx)), 0, -1):
            start = self._after.get(tuple(ctx[-n:]))
            if start is not None:
                out: list[int] = []
                for j in range(k):  # may run on into its own draft: ctx + out
                    i = start + j
                    out.append(ctx[i] if i < len(ctx) else out[i - len(ctx)])
                return out
        return []


def accepted(greedy: list[int], draft: list[int]) -> list[int]:
    """The tokens greedy decoding makes from a verified run: the draft's tokens while they equal
    greedy's choice (`greedy[j]` is the argmax after the row's next token and draft[:j]), then
    greedy's own token where they first differ, or after a draft kept whole."""
    out = []
    for j, token in enumerate(greedy):
        out.append(token)
        if j == len(draft) or draft[j] != token:
            break
    return out
