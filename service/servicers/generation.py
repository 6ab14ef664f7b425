"""tserve.generation.v1.TextGeneration: unary and server-streaming generation."""

from __future__ import annotations


from service.errors import TServeError
from service.generated import generation_pb2_grpc as gen_grpc
from service.generation.engine import Event
from service.generation.service import Generation
from service.logs import request_id
from service.servicers import converters
from service.servicers.inference import deadline_of
from service.servicers.status import handle_errors, status_of


class GenerationServicer(gen_grpc.TextGenerationServicer):
    def __init__(self, generation: Generation, admit) -> None:
        self.generation = generation
        self.admit = admit  # raises Unavailable while draining

    async def _events(self, request, context):
        """Yield the sequence's events in chunks: everything produced since the last message.
        A client keeping up gets one token per message; one that falls behind (or a server
        under load) gets fewer, larger messages instead of a growing backlog. A client that
        goes away stops its sequence within one step."""
        request_id.set(request.request_id[:64])
        self.admit()
        engine, seq = self.generation.prepare(converters.generate_input_from_proto(request), deadline_of(context))
        engine.submit(seq)
        try:
            while True:
                chunk: list[Event] = [await seq.events.get()]
                while not chunk[-1].finish_reason and not seq.events.empty():
                    chunk.append(seq.events.get_nowait())
                yield chunk
                if chunk[-1].finish_reason:
                    return
        finally:
            engine.cancel(seq)  # no-op when finished; frees the slot on cancel or disconnect

    @handle_errors
    async def Generate(self, request, context):
        events = [e async for chunk in self._events(request, context) for e in chunk]
        return converters.generate_response_to_proto(request.model, request.request_id, events)

    async def GenerateStream(self, request, context):
        try:
            async for chunk in self._events(request, context):
                yield converters.stream_chunk_to_proto(chunk)
        except TServeError as e:
            await context.abort(status_of(e), e.message)
