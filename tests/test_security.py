"""TLS, mutual TLS and API keys on a real server; health and reflection stay open for probes."""

from __future__ import annotations

import subprocess
import urllib.request

import grpc
import pytest
from certs import make_certs
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from poolsvc_client import Client, make_channel
from test_grpcurl import GRPCURL

from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc

KEY = "s3cret-token"
REQUEST = embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="secure hello")])


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_api_key_guards_model_rpcs_only(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    srv = ServerProcess(tmp_path / "server.log", "--api-key-file", str(key_file)).wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Embed(REQUEST, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in info.value.details()
            wrong = (("authorization", "Bearer nope"),)
            assert status_of(lambda: stub.Embed(REQUEST, timeout=30, metadata=wrong)) == \
                grpc.StatusCode.UNAUTHENTICATED
            stream = stub.EmbedStream(iter([embed_pb2.EmbedStreamRequest(id="1", request=REQUEST)]),
                                      timeout=30)
            assert status_of(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
            right = (("authorization", f"Bearer {KEY}"),)
            reply = stub.Embed(REQUEST, timeout=30, metadata=right)
            assert list(reply.embeddings.shape) == [1, 384]
            health = health_pb2_grpc.HealthStub(channel)  # probes need no token
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
                health_pb2.HealthCheckResponse.SERVING
        listed = subprocess.run([GRPCURL, "-plaintext", srv.address, "list"], capture_output=True,
                                text=True, timeout=60)
        assert "poolsvc.v1.EmbedService" in listed.stdout  # reflection too
        with Client(srv.address, api_key=KEY) as client:
            assert client.embed("x").shape == (1, 384)
    finally:
        assert srv.terminate() == 0


def test_tls(tmp_path, certs):
    srv = ServerProcess(tmp_path / "server.log", "--tls-cert", str(certs["server"]), "--tls-key",
                        str(certs["server_key"])).wait_ready()
    try:
        with Client(srv.address, root_ca=str(certs["ca"])) as client:
            assert client.embed("over TLS").shape == (1, 384)
            assert client.health() == "SERVING"
        with grpc.insecure_channel(srv.address) as plain:
            assert status_of(lambda: embed_pb2_grpc.EmbedServiceStub(plain).Embed(
                REQUEST, timeout=10)) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert srv.terminate() == 0


def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path, certs):
    metrics = free_port()
    srv = ServerProcess(tmp_path / "server.log", "--tls-cert", str(certs["server"]), "--tls-key",
                        str(certs["server_key"]), "--tls-client-ca", str(certs["ca"]),
                        "--metrics-port", str(metrics)).wait_ready()
    try:
        anonymous = make_channel(srv.address, root_ca=str(certs["ca"]))
        assert status_of(lambda: embed_pb2_grpc.EmbedServiceStub(anonymous).Embed(
            REQUEST, timeout=10)) == grpc.StatusCode.UNAVAILABLE
        assert status_of(lambda: health_pb2_grpc.HealthStub(anonymous).Check(
            health_pb2.HealthCheckRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE
        anonymous.close()
        with Client(srv.address, root_ca=str(certs["ca"]), cert=str(certs["client"]),
                    key=str(certs["client_key"])) as client:
            assert client.embed("mutual").shape == (1, 384)
        # Kubernetes' gRPC probes cannot present certificates: the HTTP probes stay plaintext.
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}{path}", timeout=10) as r:
                assert r.status == 200
    finally:
        assert srv.terminate() == 0
