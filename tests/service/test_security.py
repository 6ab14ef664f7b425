"""TLS, mutual TLS and bearer tokens, with real certificates made in test setup and real
clients: tritonclient.grpc with ssl=True, grpc's generation stub and the health service."""

from __future__ import annotations

import numpy as np
import pytest
import grpc
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from tests.conftest import BYTEGPT_VOCAB, DEFAULT_REPOSITORY
from tests.service.certs import make_certificates
from service.launcher import ServerProcess

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    import shutil

    repo = tmp_path_factory.mktemp("secure_repo")
    shutil.copytree(DEFAULT_REPOSITORY / "bytegpt", repo / "bytegpt")
    return repo


def secure_channel(address: str, certs, client: str | None = None, token: str | None = None) -> grpc.Channel:
    pair = certs[client] if client else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs["ca"].cert.read_bytes(),
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials)


def ids_input() -> tc.InferInput:
    x = tc.InferInput("input_ids", [1, 4], "INT64")
    x.set_data_from_numpy(np.array([[100, 101, 102, 103]], np.int64))
    return x


@pytest.fixture(scope="module")
def tls_server(repository, certs, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"# one per line\n{TOKEN}\n")
    with ServerProcess(
        repository,
        "--tls-cert-file",
        str(certs["server"].cert),
        "--tls-key-file",
        str(certs["server"].key),
        "--auth-tokens-file",
        str(tokens),
        "--log-level",
        "debug",
        tls_ca=certs["ca"].cert,
    ) as server:
        yield server


def test_tls_with_a_bearer_token_serves_tritonclient_and_generation(tls_server, certs):
    client = tc.InferenceServerClient(tls_server.address, ssl=True, root_certificates=str(certs["ca"].cert))
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert client.is_server_ready(headers=headers)
    logits = client.infer("bytegpt", [ids_input()], headers=headers).as_numpy("logits")
    assert logits.shape == (1, 4, BYTEGPT_VOCAB)
    with secure_channel(tls_server.address, certs, token=TOKEN) as channel:
        stream = list(
            gen_grpc.TextGenerationStub(channel).GenerateStream(
                gen.GenerateRequest(model="bytegpt", text="def f(", max_new_tokens=8), timeout=30
            )
        )
    assert stream[-1].usage.generated_tokens == 8


@pytest.mark.parametrize("token, message", [(None, "requires a bearer token"), ("wrong", "not accepted")])
def test_calls_without_an_accepted_token_are_refused(tls_server, certs, token, message):
    client = tc.InferenceServerClient(tls_server.address, ssl=True, root_certificates=str(certs["ca"].cert))
    headers = {"authorization": f"Bearer {token}"} if token else None
    for call in (
        lambda: client.infer("bytegpt", [ids_input()], headers=headers),
        lambda: client.get_model_metadata("bytegpt", headers=headers),
        lambda: client.get_model_repository_index(headers=headers),
    ):
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED") as info:
            call()
        assert message in str(info.value)
    with secure_channel(tls_server.address, certs, token=token) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(
                gen_grpc.TextGenerationStub(channel).GenerateStream(
                    gen.GenerateRequest(model="bytegpt", text="x", max_new_tokens=2), timeout=10
                )
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in tls_server.log()  # tokens are never logged


def test_health_stays_open_for_probes_and_plaintext_is_refused(tls_server, certs):
    with secure_channel(tls_server.address, certs) as channel:  # TLS, no token
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(tls_server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(repository, certs):
    with ServerProcess(
        repository,
        "--tls-cert-file",
        str(certs["server"].cert),
        "--tls-key-file",
        str(certs["server"].key),
        "--tls-client-ca-file",
        str(certs["ca"].cert),
        tls_ca=certs["ca"].cert,
        tls_client=certs["client"],
    ) as server:
        trusted = tc.InferenceServerClient(
            server.address,
            ssl=True,
            root_certificates=str(certs["ca"].cert),
            private_key=str(certs["client"].key),
            certificate_chain=str(certs["client"].cert),
        )
        assert trusted.infer("bytegpt", [ids_input()]).as_numpy("logits").shape == (1, 4, BYTEGPT_VOCAB)
        for client in (None, "rogue_client"):
            with secure_channel(server.address, certs, client=client) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, client  # the handshake fails


def test_tls_settings_are_checked_at_start(repository, certs):
    import subprocess
    import sys

    from tests.conftest import ROOT

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model-repository",
            str(repository),
            "--tls-cert-file",
            str(certs["server"].cert),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "tls_cert_file and tls_key_file go together" in res.stderr


def test_health_can_require_the_token_too(repository):
    with (
        ServerProcess(
            repository, "--no-auth-open-health", env={"TSERVE_AUTH_TOKEN": TOKEN}, wait_token=TOKEN
        ) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status = health.Check(
            health_pb2.HealthCheckRequest(), timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")]
        ).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_the_container_healthcheck_speaks_tls(tls_server, certs):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {
        **os.environ,
        "TSERVE_TLS_CERT_FILE": str(certs["server"].cert),
        "TSERVE_HEALTHCHECK_CA_FILE": str(certs["ca"].cert),
    }
    res = subprocess.run(
        [sys.executable, "-m", "service.healthcheck", tls_server.address],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0 and "SERVING" in res.stdout, res.stderr
