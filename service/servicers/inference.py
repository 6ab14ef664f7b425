"""inference.GRPCInferenceService: the Open Inference Protocol, with Triton's extensions."""

from __future__ import annotations

import time

import grpc

from service import __version__, tracing
from service.dataplane import DataPlane
from service.errors import TServeError
from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from service.servicers import converters
from service.servicers.status import handle_errors

EXTENSIONS = ["model_configuration", "statistics", "model_repository", "model_repository(unload_dependents)"]


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def traced(dp: DataPlane, context: grpc.aio.ServicerContext) -> None:
    """With tracing on, keep the caller's traceparent/tracestate metadata for the request's span."""
    if dp.tracing is not None:
        tracing.take(context.invocation_metadata() or ())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    @handle_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @handle_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dp.ready())

    @handle_errors
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version))

    @handle_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="tserve", version=__version__, extensions=EXTENSIONS)

    @handle_errors
    async def ModelMetadata(self, request, context):
        mv = self.dp.model(request.name, request.version, ready=True)
        return converters.model_metadata_to_proto(mv, self.dp.ready_versions(request.name))

    @handle_errors
    async def ModelConfig(self, request, context):
        mv = self.dp.model(request.name, request.version, ready=True)
        return pb.ModelConfigResponse(config=mv.config)

    @handle_errors
    async def ModelStatistics(self, request, context):
        return converters.statistics_to_proto(self.dp.statistics(request.name, request.version))

    @handle_errors
    async def ModelInfer(self, request, context):
        domain = converters.infer_request_from_proto(request)
        traced(self.dp, context)
        result = await self.dp.infer(domain, deadline_of(context))
        return converters.infer_response_to_proto(result, domain.requested_outputs)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each streamed request is answered in order; an error goes in error_message and the
        stream carries on, as Triton does."""
        traced(self.dp, context)
        async for request in request_iterator:
            try:
                domain = converters.infer_request_from_proto(request)
                result = await self.dp.infer(domain, deadline_of(context))
                yield pb.ModelStreamInferResponse(
                    infer_response=converters.infer_response_to_proto(result, domain.requested_outputs)
                )
            except TServeError as e:
                yield pb.ModelStreamInferResponse(
                    error_message=e.message, infer_response=pb.ModelInferResponse(id=request.id)
                )

    @handle_errors
    async def RepositoryIndex(self, request, context):
        return converters.repository_index_to_proto(self.dp.repository_index(), request.ready)

    @handle_errors
    async def RepositoryModelLoad(self, request, context):
        await self.dp.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @handle_errors
    async def RepositoryModelUnload(self, request, context):
        await self.dp.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
