"""Tokens, sessions, replay and malformed input against a real secured coordinator with two honest
workers (real processes). Each case asserts the exact gRPC status code, then that the honest workers'
next round completes with every replica agreeing (`Secured.unharmed`)."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import torch

from antorcha import PROTOCOL_VERSION
from antorcha.averaging.base import PeerDescriptor
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.proto.antorcha.v1 import coordinator_pb2_grpc as pb_grpc
from antorcha.protocol import DeviceInfo, Progress
from antorcha.security.signing import SessionKey
from antorcha.security.tokens import Role
from antorcha.worker.client import CoordinatorClient, CoordinatorRefusedError

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def _join_request(token: str, key: SessionKey | None = None, name: str = "probe") -> pb.JoinRequest:
    return pb.JoinRequest(
        protocol_version=PROTOCOL_VERSION,
        name=name,
        peer=pb.PeerInfo(peer_id=f"QmProbe{time.monotonic_ns()}", client_mode=True),
        token=token,
        session_public_key=(key or SessionKey()).public_bytes,
    )


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code(), e.value.details()  # type: ignore[attr-defined]


def _joined_client(secured: object, name: str) -> tuple[CoordinatorClient, str]:
    client = CoordinatorClient(secured.address, timeout_s=10)  # type: ignore[attr-defined]
    info = client.join(
        name=name,
        worker_id="",
        device=DeviceInfo(kind="cpu", name="probe", memory_bytes=0, tokens_per_second=0.0),
        peer=PeerDescriptor(peer_id=f"QmProbe{time.monotonic_ns()}", maddrs=(), client_mode=True),
        token=secured.token(name),  # type: ignore[attr-defined]
    )
    return client, info.worker_id


@pytest.fixture
def stub(secured: object) -> pb_grpc.CoordinatorStub:
    channel = grpc.insecure_channel(secured.address)  # type: ignore[attr-defined]
    yield pb_grpc.CoordinatorStub(channel)
    channel.close()


def test_join_without_a_token_is_unauthenticated(secured, stub) -> None:
    code, details = _code(lambda: stub.Join(_join_request(""), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "no token given" in details
    secured.unharmed()


def test_join_with_a_wrong_token_is_unauthenticated(secured, stub) -> None:
    real = secured.token("someone")
    forged = real[: -4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    for token in (forged, "ant_ffffffffffff_notarealsecret", "not-even-a-token"):
        code, details = _code(lambda t=token: stub.Join(_join_request(t), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED, details
    secured.unharmed()


def test_expired_token_is_unauthenticated(secured, stub) -> None:
    token, record = secured.tokens.create("short-lived", Role.WORKER, ttl_s=60, now_unix=time.time() - 120)
    code, details = _code(lambda: stub.Join(_join_request(token), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in details and record.id in details
    secured.unharmed()


def test_operator_token_cannot_join_and_worker_token_cannot_operate(secured, stub) -> None:
    operator = secured.token("op", Role.OPERATOR)
    code, details = _code(lambda: stub.Join(_join_request(operator), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "operator token" in details
    worker = secured.token("not-an-operator")
    code, _ = _code(lambda: stub.Pause(pb.PauseRequest(), metadata=[("authorization", f"Bearer {worker}")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _code(lambda: stub.Pause(pb.PauseRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _code(lambda: stub.GetRunStatus(pb.GetRunStatusRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert not secured.cluster.status().paused  # nothing was paused by the refused calls
    secured.unharmed()


def test_revoked_token_mid_run_drops_the_worker(secured) -> None:
    token = secured.token("revokee")
    proc = secured.cluster.start_worker("revokee", {"token": token})
    secured.cluster.wait_for(
        lambda s: any(w.name == "revokee" and w.rounds_contributed > 0 for w in s.workers), 120
    )
    # Revoked from another process, through the CLI, while the coordinator runs.
    revoke = subprocess.run(
        [sys.executable, "-m", "antorcha", "token", "--tokens-file", str(secured.tokens.path), "revoke",
         "revokee"], capture_output=True, text=True, timeout=60,
    )
    assert revoke.returncode == 0, revoke.stderr
    assert proc.wait(60) == 3, secured.cluster.tail("revokee")
    log = secured.cluster.tail("revokee", 60)
    assert "UNAUTHENTICATED" in log and "revoked" in log
    status = secured.cluster.status()
    worker = next(w for w in status.workers if w.name == "revokee")
    assert worker.state == "evicted" and "revoked" in worker.detail
    after = status.round
    status = secured.unharmed()
    assert all(r.workers == 2 for r in status.rounds if r.round > after)  # it is not in later rounds


def test_session_replayed_by_another_peer_is_unauthenticated(secured, stub) -> None:
    client, worker_id = _joined_client(secured, "victim")
    try:
        thief = SessionKey()  # knows the session id, not the key
        thief.session_id = client.session.session_id
        request = pb.HeartbeatRequest(worker_id=worker_id)
        code, details = _code(
            lambda: stub.Heartbeat(request, metadata=thief.metadata("Heartbeat", request.SerializeToString()))
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED and "signature" in details
        # The session holder is still fine, and cannot speak for another worker id either.
        assert client.heartbeat(worker_id, Progress())[0] == "continue"
        honest = next(w.worker_id for w in secured.cluster.status().workers if w.name == "honest-a")
        other = pb.HeartbeatRequest(worker_id=honest)
        signed = client.session.metadata("Heartbeat", other.SerializeToString())
        code, _ = _code(lambda: stub.Heartbeat(other, metadata=signed))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        client.leave(worker_id, "test done")
        client.close()
    secured.unharmed()


def test_request_replayed_later_is_unauthenticated(secured, stub) -> None:
    client, worker_id = _joined_client(secured, "recorded")
    try:
        request = pb.HeartbeatRequest(worker_id=worker_id)
        recorded = client.session.metadata("Heartbeat", request.SerializeToString())
        stub.Heartbeat(request, metadata=recorded, timeout=10)  # the original goes through
        code, details = _code(lambda: stub.Heartbeat(request, metadata=recorded, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "already received" in details
        # Recorded long ago (a fresh nonce, but a time stamp outside the clock window).
        client.session.clock_offset_s -= 600
        stale = client.session.metadata("Heartbeat", request.SerializeToString())
        client.session.clock_offset_s += 600
        code, details = _code(lambda: stub.Heartbeat(request, metadata=stale, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "time stamp" in details
        # A body altered under a valid signature.
        signed = client.session.metadata("Heartbeat", request.SerializeToString())
        altered = pb.HeartbeatRequest(worker_id=worker_id, progress=pb.Progress(tokens=10**9))
        code, _ = _code(lambda: stub.Heartbeat(altered, metadata=signed, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.leave(worker_id, "test done")
        client.close()
    secured.unharmed()


def test_malformed_protobuf_is_invalid_argument(secured) -> None:
    channel = grpc.insecure_channel(secured.address)
    try:
        for method in ("Join", "Heartbeat", "ReportRound", "Pause"):
            raw = channel.unary_unary(f"/antorcha.v1.Coordinator/{method}")
            code, details = _code(lambda r=raw: r(b"\xff\xff\xff\xff\x0f garbage", timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
            assert "not a valid protobuf" in details
    finally:
        channel.close()
    secured.unharmed()


def test_oversized_message_is_resource_exhausted(secured) -> None:
    big = 16 * 1024 * 1024  # twice the coordinator's max_message_bytes
    channel = grpc.insecure_channel(
        secured.address, options=[("grpc.max_send_message_length", 2 * big)]
    )
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        request = _join_request(secured.token("bulky"), name="x" * big)
        code, _ = _code(lambda: stub.Join(request, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()
    secured.unharmed()


def test_flood_of_join_calls_is_resource_exhausted(secured, stub) -> None:
    codes = []
    for _ in range(80):
        try:
            stub.Join(_join_request("ant_000000000000_flood"), timeout=10)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED}
    # The honest workers' calls are limited per worker id, not by the flood from this address.
    secured.unharmed()
    time.sleep(10)  # the Join bucket refills before the next test joins


def test_worker_without_token_is_told_what_to_set(secured) -> None:
    proc = secured.cluster.start_worker("tokenless", {})
    assert proc.wait(120) == 3
    assert "needs a join token" in secured.cluster.tail("tokenless")
    secured.unharmed()


def test_revoked_session_cannot_be_used_by_its_holder(secured) -> None:
    client, worker_id = _joined_client(secured, "holder")
    try:
        assert client.heartbeat(worker_id, Progress())[0] == "continue"
        secured.tokens.revoke("holder")
        with pytest.raises(CoordinatorRefusedError) as e:
            client.heartbeat(worker_id, Progress())
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.close()
    secured.unharmed()


def test_wrong_shape_state_is_refused_and_the_model_kept(secured) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from antorcha.config import RunSpec
    from antorcha.diloco.params import ParamLayout
    from antorcha.diloco.state import CorruptStateError, _metadata, decode_state
    from antorcha.model import build_model

    client, worker_id = _joined_client(secured, "state-reader")
    try:
        got = client.get_state(worker_id, min_round=0, wait_s=60)
        spec = RunSpec(**{k: v for k, v in secured.cluster.run.items()})
        model = build_model(spec.model_size, 256, spec.seq_len, 123)
        layout = ParamLayout.of(model)
        assert decode_state(layout, got.data, spec.run_id).checksum == got.checksum  # intact: accepted
        before = [p.detach().clone() for p in model.parameters()]
        tensors = st_load(got.data)
        name = next(k for k in tensors if k.startswith("param/") and tensors[k].dim() == 2)
        tensors[name] = tensors[name][:, :-1].contiguous()  # one column short
        tampered = st_save(tensors, metadata=_metadata(got.data))
        with pytest.raises(CorruptStateError, match="wrong shapes"):
            decode_state(layout, tampered, spec.run_id)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        # Asking for state past its end is an error with a code, not a hang or an empty answer.
        request = pb.GetStateRequest(worker_id=worker_id, min_round=0, offset=10**12)
        signed = client._signed("GetState", request)
        code, _ = _code(lambda: list(client.stub.GetState(request, timeout=30, metadata=signed)))
        assert code == grpc.StatusCode.OUT_OF_RANGE
    finally:
        client.leave(worker_id, "test done")
        client.close()
    secured.unharmed()
