"""Generation requests in domain terms: what a model generates with, and checking a request
against it before it reaches the engine."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import InvalidInput, short
from service.generation.chat import ChatTemplate
from service.generation.sampling import SamplingParams
from service.generation.sequence import Sequence
from service.generation.tokenizer import Tokenizer, load_tokenizer
from service.types import ModelSpec

DEFAULT_CONTEXT = 1024  # when neither the config nor the manifest says


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
        return cls(
            tokenizer=tokenizer,
            eos_token_ids=frozenset(e for e in eos if e is not None),
            max_context=spec.max_sequence_length or DEFAULT_CONTEXT,  # the repository folds in the manifest's
            vocab_size=spec.vocab_size,
            chat_template=spec.chat_template,
            seq2seq_max_new=spec.max_new_tokens if spec.seq2seq is not None else None,
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
    stops = tuple(s for s in req.stop if s)
    if any(len(s) > 256 for s in stops) or len(stops) > 16:
        raise InvalidInput(f"at most 16 stop sequences of at most 256 characters ({short(stops[:2])})")
    return Sequence(
        request_id=req.request_id,
        prompt=prompt,
        params=SamplingParams(temperature, top_k, top_p, req.seed),
        max_new_tokens=max_new,
        min_tokens=req.min_tokens,
        stop=stops,
        deadline=deadline,
        eos_token_ids=frozenset() if req.ignore_eos else config.eos_token_ids,
        # a continuation's text follows its prompt's; an encoder-decoder's output starts afresh
        decoder=config.tokenizer.decoder(prompt if config.seq2seq_max_new is None else [])
        if config.tokenizer
        else None,
    )
