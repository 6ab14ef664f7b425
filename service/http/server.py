"""uvicorn in the gRPC server's event loop: one process, one loop, one data plane. tserve owns
the signals and the drain (service/server.py), so uvicorn's own signal handling is off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from service.auth import TokenAuth
from service.dataplane import DataPlane
from service.http.app import build_app
from service.settings import Settings

log = logging.getLogger(__name__)


def _listen(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket created with proto IPPROTO_TCP, not 0 as socket.create_server makes
    it: asyncio sets TCP_NODELAY only on connections whose socket says IPPROTO_TCP, and without it
    Nagle holds a response's body behind its headers until the client's delayed ACK, 40 ms later,
    on every keep-alive request whose answer is written in two parts (measured here: 56-88 ms
    for a 25 ms embedding, 12-40 ms once set)."""
    family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET  # as socket.create_server chose
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # --workers: every worker listens on the port, the kernel spreads connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # SIGTERM starts tserve's drain, not uvicorn's exit
        yield


class HttpServer:
    def __init__(self, dp: DataPlane, settings: Settings, auth: TokenAuth | None, reuse_port: bool = False) -> None:
        self.reuse_port = reuse_port
        s = settings
        tls = {}
        if s.tls_cert_file is not None:
            tls = {"ssl_certfile": str(s.tls_cert_file), "ssl_keyfile": str(s.tls_key_file)}
            if s.tls_client_ca_file is not None:
                tls.update(ssl_ca_certs=str(s.tls_client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            build_app(dp, auth, s.auth_open_health, s.admission_bound, s.max_message_bytes),
            host=s.host,
            port=s.http_port,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # the in-flight bound is tserve's (service/http/limits.py): 429 with Retry-After, not 503
            **tls,
        )
        self.server = _Server(config)
        self.port = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        # bound here, not by uvicorn, whose bind failure is a sys.exit inside the loop
        config = self.server.config
        try:
            sock = _listen(config.host, config.port, config.backlog, self.reuse_port)
        except OSError as e:
            raise OSError(f"could not bind HTTP to {config.host}:{config.port}: {e.strerror}") from e
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="http")
        while not self.server.started:
            if self._task.done():
                raise OSError(f"HTTP server on port {self.port} stopped at start: {self._task.exception()!r}")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Close the listener and idle connections; wait up to `grace` for open ones."""
        if self._task is None:
            return
        self.server.config.timeout_graceful_shutdown = max(0.1, grace)
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
