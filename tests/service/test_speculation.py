"""Prompt lookup's drafts and what greedy decoding keeps of them (the engine's runs with it are
in test_engine.py)."""

from __future__ import annotations

from service.generation.speculation import PromptLookup, accepted
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


def lookup(tokens: list[int], max_ngram: int = 3) -> PromptLookup:
    index = PromptLookup(max_ngram)
    index.extend(tokens)
    return index


def test_the_draft_is_what_followed_the_last_tokens_before():
    assert lookup([1, 2, 3, 4, 1, 2]).draft(3) == [3, 4, 1]
    assert lookup([1, 2, 3, 4, 1, 2]).draft(1) == [3]


def test_a_recent_match_copies_on_into_its_own_draft():
    assert lookup([5, 5, 5]).draft(4) == [5, 5, 5, 5]
    assert lookup([9, 7, 8, 7, 8]).draft(5) == [7, 8, 7, 8, 7]


def test_the_longest_matching_ngram_wins_over_a_later_shorter_one():
    # "1 2" was followed by 9; "2" alone was last followed by 8
    assert lookup([1, 2, 9, 3, 2, 8, 1, 2]).draft(1) == [9]
    assert lookup([1, 2, 9, 3, 2, 8, 1, 2], max_ngram=1).draft(1) == [8]


def test_the_latest_occurrence_is_copied():
    assert lookup([4, 1, 4, 2, 4]).draft(2) == [2, 4]


def test_no_earlier_occurrence_no_draft():
    assert lookup([1, 2, 3]).draft(4) == []
    assert lookup([]).draft(4) == []
    assert lookup([1, 1]).draft(0) == []


def test_sync_indexes_the_prompt_then_the_generated_tokens_once():
    index = PromptLookup(3)
    prompt, generated = [3, 1, 4, 1, 5], [9, 2, 6, 1]
    for n in range(len(generated) + 1):
        index.sync(prompt, generated[:n])
    whole = lookup(prompt + generated)
    assert index.tokens == whole.tokens and index._after == whole._after
    assert index.draft(3) == whole.draft(3) == [5, 9, 2]


def test_greedy_keeps_the_draft_up_to_its_first_miss_and_adds_its_own_token():
    greedy = [4, 5, 6]  # argmax after the next token, after draft[:1], after draft[:2]
    assert accepted(greedy, [4, 5]) == [4, 5, 6]  # all right: one more than drafted
    assert accepted(greedy, [4, 9]) == [4, 5]
    assert accepted(greedy, [7, 5]) == [4]


def test_the_draft_grows_while_drafts_are_kept_and_shrinks_after_misses():
    index = PromptLookup(3, max_draft=8)
    assert index.draft_len == 8
    index.update(drafted=8, kept=3)
    index.update(drafted=7, kept=0)
    assert index.draft_len == 6
    for _ in range(10):
        index.update(drafted=index.draft_len, kept=0)
    assert index.draft_len == 1  # never below one
    index.update(drafted=1, kept=1)
    index.update(drafted=3, kept=3)
    assert index.draft_len == 5
    for _ in range(5):
        index.update(drafted=index.draft_len, kept=index.draft_len)
    assert index.draft_len == 8  # never above max_draft
