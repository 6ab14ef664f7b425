"""Generation requests in domain terms: what a model generates with, and checking a request
against it before it reaches the engine."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from service.errors import InvalidInput, short
from service.generation.chat import ChatTemplate
from service.generation.grammar import Constraint, GrammarCompiler
from service.generation.sampling import MAX_TOP_LOGPROBS, SamplingParams
from service.generation.sequence import Sequence
from service.generation.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from service.types import ModelSpec

DEFAULT_CONTEXT = 1024  # when neither the config nor the manifest says
MAX_CHOICES = 128  # n, as OpenAI bounds it


@dataclass
class GenerateInput:
    model: str
    text: str | None
    token_ids: list[int] | None
    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: list[str]
    request_id: str
    model_version: str = ""
    add_special_tokens: bool = True  # False when the text is a rendered chat template, which has them
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks)
    min_tokens: int = 0  # no end-of-sequence token or stop sequence before this many tokens
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # None: none; k: the same for each prompt token (echo)
    constraint: Constraint | None = None  # structured output
    n: int = 1  # choices: the prompt is prefilled once, each choice samples on its own


@dataclass(frozen=True)
class GenerationConfig:
    """How one decoder model generates: its tokenizer, end-of-sequence tokens and context.

    Each comes from, in order: config.pbtxt's tserve.* parameters, a tserve manifest, the
    export's own files (config.json, generation_config.json, tokenizer.json)."""

    tokenizer: Tokenizer | None
    eos_token_ids: frozenset[int]
    max_context: int
    vocab_size: int | None
    chat_template: ChatTemplate | None = None
    seq2seq_max_new: int | None = None  # encoder-decoders: max_context bounds the source, this the output
    grammar: GrammarCompiler | None = None  # structured output, for a model with a tokenizer.json

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GenerationConfig:
        generation = (spec.manifest or {}).get("generation") or {}
        tokenizer = load_tokenizer(spec.tokenizer, spec.tokenizer_file)
        if "eos_token_id" in generation:
            value = generation["eos_token_id"]
            eos = set(value) if isinstance(value, list) else {value}
        elif spec.eos_token_ids:
            eos = set(spec.eos_token_ids)
        else:
            eos = {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set()
        eos_ids = frozenset(e for e in eos if e is not None)
        return cls(
            tokenizer=tokenizer,
            eos_token_ids=eos_ids,
            max_context=spec.max_sequence_length or DEFAULT_CONTEXT,  # the repository folds in the manifest's
            vocab_size=spec.vocab_size,
            chat_template=spec.chat_template,
            seq2seq_max_new=spec.max_new_tokens if spec.seq2seq is not None else None,
            grammar=GrammarCompiler(spec.tokenizer_file, spec.vocab_size, eos_ids)
            if isinstance(tokenizer, HFTokenizer)
            else None,
        )


def to_sequence(
    config: GenerationConfig, req: GenerateInput, default_max_new_tokens: int, deadline: float | None
) -> Sequence:
    """Check a request against its model; raises InvalidInput naming the problem."""
    if req.text is not None:
        if config.tokenizer is None:
            raise InvalidInput(f"model {req.model!r} has no tokenizer the server can load: send token_ids")
        prompt = config.tokenizer.encode(req.text, req.add_special_tokens)
    else:
        prompt = list(req.token_ids or [])
    if not prompt:
        raise InvalidInput("the prompt is empty")
    vocab = config.vocab_size
    if vocab is not None:
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidInput(f"prompt token id {bad} is outside model {req.model!r}'s vocabulary [0, {vocab})")
    context = config.max_context
    if config.seq2seq_max_new is not None:  # an encoder-decoder: the prompt is its source
        if len(prompt) > context:
            raise InvalidInput(f"the source is {len(prompt)} tokens; model {req.model!r} reads at most {context}")
        room = config.seq2seq_max_new
    elif len(prompt) >= context:
        raise InvalidInput(
            f"the prompt is {len(prompt)} tokens; model {req.model!r}'s context is {context}, "
            "which leaves no room to generate"
        )
    else:
        room = context - len(prompt)
    if req.max_new_tokens is not None:
        if req.max_new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1")
        if req.max_new_tokens > room:
            if config.seq2seq_max_new is not None:
                raise InvalidInput(
                    f"max_new_tokens {req.max_new_tokens} exceeds model {req.model!r}'s longest output, {room} tokens"
                )
            raise InvalidInput(
                f"max_new_tokens {req.max_new_tokens} exceeds the {room} tokens the context "
                f"({context}) leaves after a {len(prompt)}-token prompt"
            )
        max_new = req.max_new_tokens
    else:
        max_new = min(default_max_new_tokens, room)
    if not 0 <= req.min_tokens <= max_new:
        raise InvalidInput(f"min_tokens must be between 0 and max_new_tokens ({max_new}); got {req.min_tokens}")
    temperature = 0.0 if req.temperature is None else req.temperature
    if not temperature >= 0:
        raise InvalidInput(f"temperature must be >= 0 (got {temperature})")
    top_k = 0 if req.top_k is None else req.top_k
    if top_k < 0:
        raise InvalidInput(f"top_k must be >= 0 (got {top_k})")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1] (got {top_p})")
    params = sampling_params(config, req, temperature, top_k, top_p)
    if req.prompt_logprobs is not None and config.seq2seq_max_new is not None:
        raise InvalidInput(
            f"model {req.model!r} is an encoder-decoder: its prompt is a source, which has no log-probabilities"
        )
    grammar = None
    if req.constraint is not None:
        if config.grammar is None:
            raise InvalidInput(
                f"{req.constraint.where}: model {req.model!r} has no tokenizer.json, which structured output needs"
            )
        grammar = config.grammar.compile(req.constraint)
    stops = tuple(s for s in req.stop if s)
    if any(len(s) > 256 for s in stops) or len(stops) > 16:
        raise InvalidInput(f"at most 16 stop sequences of at most 256 characters ({short(stops[:2])})")
    if not 1 <= req.n <= MAX_CHOICES:
        raise InvalidInput(f"n must be between 1 and {MAX_CHOICES} (got {req.n})")

    def choice(index: int, parent: Sequence | None) -> Sequence:
        # choice i of seed s draws as one choice of seed s + i: reproducible, and each its own stream
        seed = None if params.seed is None else (params.seed + index) % (1 << 64)
        return Sequence(
            request_id=req.request_id,
            prompt=prompt,
            params=dataclasses.replace(params, seed=seed),
            max_new_tokens=max_new,
            min_tokens=req.min_tokens,
            stop=stops,
            deadline=deadline,
            eos_token_ids=frozenset() if req.ignore_eos else config.eos_token_ids,
            prompt_logprobs=req.prompt_logprobs,
            grammar=None if grammar is None else (grammar if parent is None else grammar.copy()),
            # a continuation's text follows its prompt's; an encoder-decoder's output starts afresh
            decoder=config.tokenizer.decoder(prompt if config.seq2seq_max_new is None else [])
            if config.tokenizer
            else None,
            index=index,
            prefill_from=parent,
            events=parent.events if parent is not None else asyncio.Queue(),
        )

    first = choice(0, None)
    first.siblings = [choice(i, first) for i in range(1, req.n)]
    return first


def sampling_params(
    config: GenerationConfig, req: GenerateInput, temperature: float, top_k: int, top_p: float
) -> SamplingParams:
    """The processors' parameters, each checked (OpenAI's and vLLM's ranges)."""
    min_p = 0.0 if req.min_p is None else req.min_p
    if not 0 <= min_p <= 1:
        raise InvalidInput(f"min_p must be in [0, 1] (got {min_p})")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        value = 0.0 if value is None else value
        if not -2 <= value <= 2:
            raise InvalidInput(f"{name} must be in [-2, 2] (got {value})")
        penalties[name] = float(value)
    repetition = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if not 0 < repetition <= 2:  # vLLM's upper bound; 1 is none
        raise InvalidInput(f"repetition_penalty must be in (0, 2] (got {repetition})")
    bias = req.logit_bias or {}
    if len(bias) > 1024:
        raise InvalidInput(f"logit_bias names {len(bias)} tokens; at most 1024")
    vocab = config.vocab_size
    for token, value in bias.items():
        if not 0 <= token < (vocab if vocab is not None else 1 << 62):
            raise InvalidInput(f"logit_bias token id {token} is outside model {req.model!r}'s vocabulary [0, {vocab})")
        if not -100 <= value <= 100:
            raise InvalidInput(f"logit_bias for token {token} must be in [-100, 100] (got {value})")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(req, name)
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise InvalidInput(f"{name} must be between 0 and {MAX_TOP_LOGPROBS} (got {k})")
    return SamplingParams(
        temperature,
        top_k,
        top_p,
        req.seed,
        min_p=float(min_p),
        repetition_penalty=float(repetition),
        logit_bias=tuple(sorted((int(t), float(v)) for t, v in bias.items())),
        logprobs=req.logprobs,
        **penalties,
    )
