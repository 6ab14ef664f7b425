"""Generation requests in domain terms: validation against the model, and the engines.

Engines are attached to decoder models when they become ready and closed when unloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import FailedPrecondition, InvalidInput, short
from service.generation.engine import GenerationEngine, Sequence
from service.generation.sampling import SamplingParams
from service.generation.tokenizer import from_manifest
from service.models import ModelManager, ModelVersion
from service.settings import Settings


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


class Generation:
    def __init__(self, manager: ModelManager, settings: Settings) -> None:
        self.manager = manager
        self.settings = settings
        manager.on_ready.append(self._attach)
        manager.on_unload.append(self._detach)

    def _attach(self, mv: ModelVersion) -> None:
        if not mv.spec.is_decoder:
            return
        s = self.settings
        engine = GenerationEngine(mv.spec, mv.runtime, self.manager.metrics, from_manifest(mv.spec.tokenizer),
                                  s.generation_max_sequences, s.generation_max_queue, s.generation_token_budget,
                                  s.generation_scheduling)
        engine.start()
        mv.extras["generation"] = engine

    async def _detach(self, mv: ModelVersion) -> None:
        engine = mv.extras.pop("generation", None)
        if engine is not None:
            await engine.close()

    @property
    def busy(self) -> int:
        """Sequences queued or running across all engines (the drain waits for them)."""
        engines = [mv.extras["generation"] for mv in self.manager.all() if "generation" in mv.extras]
        return sum(e.active + len(e.waiting) for e in engines)

    def engine(self, model: str) -> GenerationEngine:
        mv = self.manager.get(model)  # NotFound / Unavailable
        engine = mv.extras.get("generation")
        if engine is None:
            raise FailedPrecondition(
                f"model {model!r} is not a decoder with a KV cache (decoder-with-past inputs and present outputs); "
                "it cannot generate"
            )
        return engine

    def prepare(self, req: GenerateInput, deadline: float | None) -> tuple[GenerationEngine, Sequence]:
        engine = self.engine(req.model)
        if req.text is not None:
            if engine.tokenizer is None:
                raise InvalidInput(f"model {req.model!r} has no tokenizer the server can load: send token_ids")
            prompt = engine.tokenizer.encode(req.text)
        else:
            prompt = list(req.token_ids or [])
        if not prompt:
            raise InvalidInput("the prompt is empty")
        vocab = engine.spec.vocab_size
        if vocab is not None:
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidInput(f"prompt token id {bad} is outside model {req.model!r}'s vocabulary [0, {vocab})")
        context = engine.max_context
        if len(prompt) >= context:
            raise InvalidInput(f"the prompt is {len(prompt)} tokens; model {req.model!r}'s context is {context}, "
                               "which leaves no room to generate")
        room = context - len(prompt)
        if req.max_new_tokens is not None:
            if req.max_new_tokens < 1:
                raise InvalidInput("max_new_tokens must be at least 1")
            if req.max_new_tokens > room:
                raise InvalidInput(f"max_new_tokens {req.max_new_tokens} exceeds the {room} tokens the context "
                                   f"({context}) leaves after a {len(prompt)}-token prompt")
            max_new = req.max_new_tokens
        else:
            max_new = min(self.settings.generation_default_max_new_tokens, room)
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
        seq = Sequence(
            request_id=req.request_id,
            prompt=prompt,
            params=SamplingParams(temperature, top_k, top_p, req.seed),
            max_new_tokens=max_new,
            stop=stops,
            deadline=deadline,
        )
        return engine, seq
