"""TLS on the control plane: `antorcha demo --secure` (self-signed TLS + join tokens) trains end to end,
and while it runs a plaintext client, and a TLS client that does not trust the certificate, are both
refused. Plaintext on a public address is refused at start unless explicitly allowed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from antorcha import PROTOCOL_VERSION
from antorcha.config import CoordinatorSettings
from antorcha.coordinator.server import listen, make_guard
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.proto.antorcha.v1 import coordinator_pb2_grpc as pb_grpc
from antorcha.security.tls import make_self_signed


def _discover(channel: grpc.Channel) -> pb.DiscoverResponse:
    return pb_grpc.CoordinatorStub(channel).Discover(
        pb.DiscoverRequest(protocol_version=PROTOCOL_VERSION), timeout=10
    )


@pytest.mark.slow
def test_secure_demo_runs_and_plaintext_is_refused(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "antorcha", "demo", "--secure", "--workers", "2", "--rounds", "2", "--json",
         "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert demo.stdout is not None
        first = demo.stdout.readline()
        address = re.search(r"coordinator on (\S+);", first)
        assert address, first
        ca = workdir / "tls" / "cert.pem"
        # Plaintext to the TLS port: the handshake never completes.
        with grpc.insecure_channel(address.group(1)) as plain, pytest.raises(grpc.RpcError) as e:
            _discover(plain)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # TLS with a certificate we were not told to trust.
        stranger, _ = make_self_signed(tmp_path / "stranger", ["127.0.0.1"])
        creds = grpc.ssl_channel_credentials(stranger.read_bytes())
        with grpc.secure_channel(address.group(1), creds) as wrong, pytest.raises(grpc.RpcError) as e:
            _discover(wrong)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # TLS trusting the demo's certificate: answered, and tokens are required.
        with grpc.secure_channel(address.group(1), grpc.ssl_channel_credentials(ca.read_bytes())) as ok:
            assert _discover(ok).tokens_required
        out, _ = demo.communicate(timeout=600)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and summary["replicas_consistent"]
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]


def test_plaintext_on_a_public_address_is_refused_at_start() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=1))  # listen() only adds the port
    with pytest.raises(SystemExit, match=r"refusing to serve plaintext gRPC on 0\.0\.0\.0"):
        listen(server, CoordinatorSettings(host="0.0.0.0", port=0, allow_plaintext=False))


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=1))  # listen() only adds the port
    settings = CoordinatorSettings(port=0, tls_cert_file=str(tmp_path / "nope.pem"), tls_key_file="k.pem")
    with pytest.raises(SystemExit, match="cannot read the TLS"):
        listen(server, settings)


def test_auth_on_needs_somewhere_to_keep_tokens() -> None:
    with pytest.raises(SystemExit, match="nowhere to keep tokens"):
        make_guard(CoordinatorSettings(host="0.0.0.0"))
    assert CoordinatorSettings(host="0.0.0.0").auth_enabled()
    assert not CoordinatorSettings(host="127.0.0.1").auth_enabled()
    assert CoordinatorSettings(host="127.0.0.1", auth="tokens").auth_enabled()
    assert not CoordinatorSettings(host="0.0.0.0", auth="off").auth_enabled()


def test_self_signed_pair_is_valid_for_its_hosts(tmp_path: Path) -> None:
    from cryptography import x509

    cert, key = make_self_signed(tmp_path, ["127.0.0.1", "coordinator.example"])
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example" in names.get_values_for_type(x509.DNSName)
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert key.stat().st_mode & 0o077 == 0  # the private key is not readable by others
    assert parsed.not_valid_after_utc.timestamp() > time.time()
