"""Exit 0 when the local tserve's gRPC health service says SERVING (the container HEALTHCHECK,
and the Kubernetes exec probe where TLS is on: kubelet's own gRPC probe speaks no TLS).

    python -m service.healthcheck [ADDRESS]      (default 127.0.0.1:$TSERVE_GRPC_PORT or :8001)

A server with TLS (TSERVE_TLS_CERT_FILE set) is checked over TLS, trusting
TSERVE_HEALTHCHECK_CA_FILE (default: TSERVE_TLS_CLIENT_CA_FILE, else the server's own
certificate) and expecting the name TSERVE_HEALTHCHECK_SERVER_NAME (default localhost). Under
mutual TLS the probe shows TSERVE_HEALTHCHECK_CLIENT_CERT_FILE / _KEY_FILE; where health
needs a token, TSERVE_AUTH_TOKEN is sent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(var: str) -> bytes | None:
    path = os.environ.get(var)
    return Path(path).read_bytes() if path else None


def channel(address: str) -> grpc.Channel:
    if not os.environ.get("TSERVE_TLS_CERT_FILE"):
        return grpc.insecure_channel(address)
    ca = _read("TSERVE_HEALTHCHECK_CA_FILE") or _read("TSERVE_TLS_CLIENT_CA_FILE") or _read("TSERVE_TLS_CERT_FILE")
    credentials = grpc.ssl_channel_credentials(
        ca, _read("TSERVE_HEALTHCHECK_CLIENT_KEY_FILE"), _read("TSERVE_HEALTHCHECK_CLIENT_CERT_FILE")
    )
    name = os.environ.get("TSERVE_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", name)])


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else f"127.0.0.1:{os.environ.get('TSERVE_GRPC_PORT', '8001')}"
    token = os.environ.get("TSERVE_AUTH_TOKEN")
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        with channel(address) as ch:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(), timeout=3, metadata=metadata)
                .status
            )
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name}", file=sys.stderr)
        return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
