"""The HTTP listener, in-process: connections it accepts have TCP_NODELAY, so a keep-alive
answer written as headers then body is not held by Nagle until the client's delayed ACK."""

from __future__ import annotations

import asyncio
import socket

import pytest

from service.http.server import _listen

pytestmark = pytest.mark.unit


def test_accepted_connections_have_nodelay():
    async def main() -> int:
        sock = _listen("127.0.0.1", 0, 8)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        async def accepted(reader, writer):
            conn = writer.get_extra_info("socket")
            seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 5)
            writer.close()
        return value

    assert asyncio.run(main()) != 0
    # the cause, kept in view: the standard library's own listener leaves proto 0, and asyncio
    # then leaves Nagle on
    with socket.create_server(("127.0.0.1", 0)) as plain:
        assert plain.proto == 0
