"""Structured output: a grammar that constrains a sequence's tokens, with llguidance.

llguidance (the grammar engine onnxruntime-genai uses; no Python dependencies) compiles a JSON
schema, a regular expression, a list of choices or a Lark grammar against the model's own
`tokenizer.json`, and gives, at each step, the set of tokens that keep the output inside the
grammar. The engine's token path (sampling.py) computes those sets for every constrained row
of a step at once, masks the other tokens to -inf before anything else looks at the logits, and
advances each sequence's matcher with the token it chose. A grammar that has nothing left to
match ends its sequence (finish reason "stop"); otherwise the model's end-of-sequence token is
allowed only where the grammar is complete.

JSON is generated compact (no whitespace between tokens, `,` and `:` as separators, as OpenAI's
structured outputs are): a model with random weights would otherwise fill its budget with
whitespace. The output always matches the grammar; like any output it can be cut short by
max_tokens (finish reason "length"). A schema that bounds its strings, numbers and arrays is
what guarantees an output completes within a budget.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from service.errors import InvalidInput

MAX_SPEC_BYTES = 64 * 1024  # a schema, regex or grammar, serialised
MAX_CHOICES = 256
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What a request constrains its output to, in domain terms (the APIs build it)."""

    kind: Kind
    spec: str | dict | list[str] | None = None  # the schema, the regex, the choices, the Lark grammar
    where: str = "response_format"  # the request's parameter, for messages

    def grammar(self) -> str:
        """The llguidance grammar this asks for; InvalidInput naming the parameter if it is malformed."""
        from llguidance import LLMatcher

        size = len(self.spec if isinstance(self.spec, str) else json.dumps(self.spec or ""))
        if size > MAX_SPEC_BYTES:
            raise InvalidInput(f"{self.where}: {size:,} bytes, above the {MAX_SPEC_BYTES:,} a constraint may take")
        try:
            if self.kind == "json_object":
                return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
            if self.kind == "json_schema":
                if not isinstance(self.spec, dict):
                    raise InvalidInput(f"{self.where}: the schema must be a JSON object")
                return LLMatcher.grammar_from_json_schema(self.spec, overrides=JSON_OPTIONS)
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(str(self.spec))
            if self.kind == "choice":
                choices = self.spec if isinstance(self.spec, list) else []
                if not choices or len(choices) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choices):
                    raise InvalidInput(f"{self.where}: 1 to {MAX_CHOICES} non-empty strings")
                return LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in choices))
            return LLMatcher.grammar_from_lark(str(self.spec))
        except ValueError as e:
            raise InvalidInput(f"{self.where}: {e}") from None


class GrammarCompiler:
    """One model's grammar compiler: its tokenizer as llguidance reads it, built on first use
    (a vocabulary's token table takes a while) and shared by its requests."""

    def __init__(self, tokenizer_file: Path, vocab_size: int | None, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer_file = tokenizer_file
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from llguidance import LLTokenizer

                self._tokenizer = LLTokenizer(
                    str(self.tokenizer_file), n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
                )
            return self._tokenizer

    def compile(self, constraint: Constraint) -> Grammar:
        """A fresh matcher for one sequence; InvalidInput naming the problem if the grammar
        does not compile (before any compute)."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer(), constraint.grammar(), log_level=0)
        if matcher.is_error():
            raise InvalidInput(f"{constraint.where}: {matcher.get_error()[:500]}")
        return Grammar(matcher)


class Grammar:
    """One sequence's place in its grammar."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.error = ""

    def copy(self) -> Grammar:
        """The same grammar at the same place, for another choice of the request."""
        return Grammar(self.matcher.deep_copy())

    def consume(self, token: int) -> None:
        if not self.error and not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} is outside the grammar"

    @property
    def finished(self) -> bool:
        """Nothing left to match (the grammar is complete and admits no more)."""
        return self.matcher.is_stopped()


_executor = None


def mask(logits: np.ndarray, rows: list[int], grammars: list[Grammar]) -> None:
    """Each constrained row's tokens outside its grammar -> -inf, the masks of all the rows
    computed in one parallel call."""
    global _executor
    from llguidance import LLExecutor
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

    if _executor is None:
        _executor = LLExecutor()
    vocab = logits.shape[1]
    bitmask = allocate_token_bitmask(len(rows), vocab)
    fill_next_token_bitmask_par(_executor, [(g.matcher, j) for j, g in enumerate(grammars)], bitmask)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    logits[rows] = np.where(allowed, logits[rows], -np.inf)
