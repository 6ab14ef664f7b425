"""Assemble and run tserve: gRPC (inference, generation, health, reflection), HTTP (KServe v2,
OpenAI) in the same event loop, and the metrics endpoint.

Lifecycle: listen with health NOT_SERVING -> load and warm up every model -> SERVING ->
on SIGTERM/SIGINT: NOT_SERVING at once; requests arriving within drain_intake_seconds (sent
before the signal, waiting on the wire or in gRPC's intake) are still taken, later ones get
UNAVAILABLE; everything taken gets up to drain_grace_seconds; then the listener closes, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

from service.auth import TokenAuth
from service.dataplane import DataPlane
from service.generated import generation_pb2 as gen_pb
from service.generated import generation_pb2_grpc as gen_grpc
from service.generated import POOL
from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from service.http.server import HttpServer
from service.metrics import Metrics, serve_metrics
from service.models import ModelManager
from service.servicers.auth import AuthInterceptor
from service.servicers.generation import GenerationServicer
from service.servicers.inference import InferenceServicer
from service.settings import Settings
from service.tracing import from_env

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
GENERATION_SERVICE = gen_pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name


def _register_in_pool(*files) -> None:
    """Reflection answers from our private pool: give it the health and reflection files too."""
    for f in files:
        try:
            POOL.FindFileByName(f.name)
        except KeyError:
            POOL.AddSerializedFile(f.serialized_pb)


class TServe:
    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        link=None,
        late_bind: bool = False,
        replay: list[tuple[str, str]] = (),
    ) -> None:
        """`link`: this process is one of --workers (service/workers.py): the ports are shared
        (SO_REUSEPORT), the supervisor serves the metrics, health waits for every worker, and
        repository loads and unloads go to every worker. `late_bind`: a restarted worker loads
        its models (and `replay`s the repository calls made since start) before it listens."""
        self.settings = settings
        self.link, self.late_bind, self.replay = link, late_bind, list(replay)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.manager = ModelManager(settings, self.metrics)
        self.tracing = from_env()  # None unless the OTEL_* environment asks for traces
        self.dataplane = DataPlane(self.manager, settings, self.tracing)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._metrics_server = None
        self._stopping = asyncio.Event()
        self.auth = TokenAuth.from_settings(settings)
        if link is not None:
            self.dataplane.peers_ready = link.peers_ready
            self.dataplane.fanout = link.repository

    def _build_server(self) -> grpc.aio.Server:
        limit = self.settings.max_message_bytes
        auth = self.auth
        interceptors = [AuthInterceptor(auth, self.settings.auth_open_health)] if auth else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 1 if self.link else 0),  # workers share the port
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.dataplane), server)
        gen_grpc.add_TextGenerationServicer_to_server(GenerationServicer(self.dataplane), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _register_in_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        names = [
            INFERENCE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            GENERATION_SERVICE,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server, pool=POOL)
        return server

    def _tls_credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert_file is None:
            return None
        ca = s.tls_client_ca_file.read_bytes() if s.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(s.tls_key_file.read_bytes(), s.tls_cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    async def refresh_health(self) -> None:
        if self.link is not None:  # the supervisor decides whether every worker is ready
            self.link.ready(self.dataplane.ready_here())
            self.dataplane.peers_ready = self.link.peers_ready
        ready = self.dataplane.ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(INFERENCE_SERVICE, status)
        await self.health.set(GENERATION_SERVICE, status)
        # a model is SERVING when any of its versions is ready
        models: dict[str, bool] = {}
        for mv in self.manager.all():
            models[mv.name] = models.get(mv.name, False) or (ready and mv.ready)
        for name, ok in models.items():
            await self.health.set(
                name, health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        self.metrics.server_ready.set(1 if ready else 0)

    async def start(self) -> None:
        started = time.perf_counter()
        if self.link is None:
            self._metrics_server, self.metrics_port = serve_metrics(
                self.registry, self.settings.host, self.settings.metrics_port
            )
        else:
            self.link.start(self, asyncio.get_running_loop())
        if self.late_bind:  # a restarted worker: no request reaches it before its models are in
            await self._load()
        await self._listen()
        if not self.late_bind:
            await self._load()
        states = {f"{mv.name}/{mv.version}": mv.state for mv in self.manager.all()}
        log.info("loading finished in %.2fs: %s", time.perf_counter() - started, states)

    async def _listen(self) -> None:
        self.server = self._build_server()
        # grpc's health servicer starts out SERVING for the server as a whole: say otherwise
        # before the port opens, or a probe in the moment after could hear SERVING from a
        # server still loading (a supervisor's workers are probed as soon as they bind)
        await self.refresh_health()
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        credentials = self._tls_credentials()
        self.grpc_port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        if not self.grpc_port:
            raise OSError(f"could not bind gRPC to {self.settings.host}:{self.settings.grpc_port}")
        await self.server.start()
        if self.settings.http:
            self.http = HttpServer(self.dataplane, self.settings, self.auth, reuse_port=self.link is not None)
            self.http_port = await self.http.start()
        await self.refresh_health()  # NOT_SERVING while loading
        if self.settings.port_file:
            self.settings.port_file.write_text(
                json.dumps({"grpc": self.grpc_port, "http": self.http_port, "metrics": self.metrics_port})
            )
        log.info(
            "listening: gRPC %s:%d, HTTP %s (%s), metrics %s",
            self.settings.host,
            self.grpc_port,
            f"{self.settings.host}:{self.http_port}" if self.http else "off",
            "mutual TLS" if self.settings.tls_client_ca_file else "TLS" if credentials else "plaintext",
            f"{self.settings.host}:{self.metrics_port}" if self.link is None else "the supervisor's",
        )

    async def _load(self) -> None:
        await self.manager.load_all()
        for op, name in self.replay:  # a restarted worker catches up with the others
            await (self.manager.load(name) if op == "load" else self.manager.unload(name))
        self.dataplane.loading_done = True
        self.manager.on_change.append(self._model_changed)
        await self.refresh_health()

    async def _model_changed(self, _mv) -> None:
        """A load or unload through the repository API: health follows before the RPC returns."""
        await self.refresh_health()

    def request_stop(self) -> None:
        self._stopping.set()

    async def drain(self) -> None:
        """NOT_SERVING, refuse new work, let in-flight requests finish within the grace."""
        grace, intake = (
            self.settings.drain_grace_seconds,
            min(self.settings.drain_intake_seconds, self.settings.drain_grace_seconds),
        )
        log.info("draining: %d requests in flight (both APIs), grace %.1fs", self.dataplane.inflight, grace)
        started = time.monotonic()
        self.dataplane.draining = True  # readiness off ...
        self.metrics.server_ready.set(0)
        if self.link is not None:  # ... for every worker: the pod leaves the load balancer whole
            self.link.ready(False)
        await self.health.enter_graceful_shutdown()
        # ... but what was sent before the signal and is still in gRPC's intake gets served
        if intake > 0 and self.dataplane.loading_done:  # nothing was taken before start-up finished
            await asyncio.sleep(max(0.0, started + intake - time.monotonic()))
        self.dataplane.refusing = True
        deadline = started + grace
        while self.dataplane.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.http:
            await self.http.stop(deadline - time.monotonic())
        if self.server:
            await self.server.stop(max(0.0, deadline - time.monotonic()))
        await self.manager.close()
        if self.tracing is not None:
            self.tracing.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("stopped")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            await self.drain()
