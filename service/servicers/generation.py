"""tserve.generation.v1.TextGeneration: unary and server-streaming generation."""

from __future__ import annotations

from contextlib import aclosing

from service.dataplane import DataPlane
from service.generated import generation_pb2_grpc as gen_grpc
from service.servicers import converters
from service.servicers.inference import deadline_of, traced
from service.servicers.status import handle_errors, handle_stream_errors


class GenerationServicer(gen_grpc.TextGenerationServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    @handle_errors
    async def Generate(self, request, context):
        domain = converters.generate_input_from_proto(request)
        traced(self.dp, context)
        async with aclosing(self.dp.generate(domain, deadline_of(context))) as chunks:
            events = [e async for chunk in chunks for e in chunk]
        return converters.generate_response_to_proto(request.model, request.request_id, events)

    @handle_stream_errors
    async def GenerateStream(self, request, context):
        domain = converters.generate_input_from_proto(request)
        traced(self.dp, context)
        async with aclosing(self.dp.generate(domain, deadline_of(context))) as chunks:
            async for chunk in chunks:
                for message in converters.stream_chunk_to_proto(chunk):
                    yield message
