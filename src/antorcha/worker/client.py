"""The worker's side of the control plane: typed calls to the coordinator's gRPC service.

Every call has a deadline. Transient failures (coordinator restarting, network blip) are retried
with exponential backoff and jitter, and raise `CoordinatorUnreachableError` once the call's patience
is spent; refusals (bad version, unknown or evicted worker) raise `CoordinatorRefusedError` at once
with the coordinator's message. `on_bytes(plane, sent, received)` is told the size of every message.

Auth: Join sends the join token and the public key of a fresh session key pair; every later worker call
carries the session id and a signature (`antorcha.security.signing`); operator calls carry the operator
token. With `tls` (or a CA file) the channel is TLS.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from antorcha import PROTOCOL_VERSION, __version__
from antorcha.averaging.base import AveragingGroup, PeerDescriptor
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.proto.antorcha.v1 import coordinator_pb2_grpc as pb_grpc
from antorcha.protocol import DeviceInfo, Progress, device_to_pb, group_from_pb, peer_to_pb, progress_to_pb
from antorcha.security.signing import OPERATOR_KEY, SessionKey
from antorcha.security.tls import channel_credentials

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


# Answers that retrying cannot change: who we are is not accepted.
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}


class CoordinatorRefusedError(RuntimeError):
    """The coordinator answered with a definite no; retrying will not help."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"coordinator refused ({code.name}): {message}")
        self.code = code


class CoordinatorUnreachableError(ConnectionError):
    """The coordinator did not answer for as long as the call was willing to wait."""


class StateDownloadError(RuntimeError):
    """The state could not be downloaded intact."""


@dataclass(frozen=True)
class JoinInfo:
    worker_id: str
    run_id: str
    run_spec_json: str
    run_spec_sha256: str
    round: int
    state_checksum: str
    lease_s: float
    heartbeat_interval_s: float


@dataclass(frozen=True)
class GroupAnswer:
    accepted: bool
    reason: str
    group: AveragingGroup | None
    next_round: int


@dataclass(frozen=True)
class CommitAnswer:
    instruction: str  # "continue", "resync" or "stop"
    reason: str
    next_round: int


@dataclass(frozen=True)
class DataLease:
    shard: int
    num_shards: int
    epoch: int
    steps: int = 0
    round_full: bool = False  # no shard: report what this round trained
    reason: str = ""
    last: bool = False  # report after this shard without asking for another
    wait: bool = False  # the round is not open yet (paused, or waiting for workers): ask again later
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class StateDownload:
    round: int
    data: bytes
    checksum: str
    wire_bytes: int


_INSTRUCTIONS = {pb.CONTINUE: "continue", pb.RESYNC: "resync", pb.STOP: "stop"}


class CoordinatorClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 30.0,
        max_message_bytes: int = 8 * 1024 * 1024,
        on_bytes: Callable[[str, int, int], None] | None = None,
        *,
        tls: bool = False,
        tls_ca_file: str = "",
        operator_token: str = "",
    ) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.on_bytes = on_bytes
        self.operator_token = operator_token
        self.session = SessionKey()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
        ]
        if tls or tls_ca_file:
            self.channel = grpc.secure_channel(address, channel_credentials(tls_ca_file), options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def _signed(self, method: str, request: Message) -> list[tuple[str, str]]:
        """Session metadata for a worker call (empty before Join or when the coordinator runs without auth).
        Signed over the exact bytes gRPC sends: our requests have no map fields, so encoding is stable."""
        return self.session.metadata(method, request.SerializeToString())

    def _operator_metadata(self) -> list[tuple[str, str]]:
        return [(OPERATOR_KEY, f"Bearer {self.operator_token}")] if self.operator_token else []

    def close(self) -> None:
        self.channel.close()

    def _count(self, request: Message, response: Message, plane: str = "control") -> None:
        if self.on_bytes is not None:
            self.on_bytes(plane, request.ByteSize(), response.ByteSize())

    def _call(self, fn: Callable[[], T], what: str, patience_s: float) -> T:
        """Call, retrying transient failures with backoff until `patience_s` has passed."""
        deadline, delay = time.monotonic() + patience_s, 0.2
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code not in _TRANSIENT:
                    raise CoordinatorRefusedError(code, e.details()) from None  # type: ignore[attr-defined]
                if time.monotonic() + delay > deadline:
                    raise CoordinatorUnreachableError(
                        f"the coordinator at {self.address} did not answer {what} for {patience_s:.0f}s "
                        f"({code.name}: {e.details()}); check the address, that the coordinator is "  # type: ignore[attr-defined]
                        "running, and that its gRPC port is reachable from here"
                    ) from None
                log.warning(
                    "%s: no answer from the coordinator at %s (%s); retrying in %.1fs",
                    what,
                    self.address,
                    code.name,
                    delay,
                )
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    def discover(self, patience_s: float = 60.0) -> pb.DiscoverResponse:
        request = pb.DiscoverRequest(protocol_version=PROTOCOL_VERSION)
        r = self._call(
            lambda: self.stub.Discover(request, timeout=self.timeout_s, wait_for_ready=True),
            "discover",
            patience_s,
        )
        self._count(request, r)
        return r

    def join(
        self, *, name: str, worker_id: str, device: DeviceInfo, peer: PeerDescriptor, token: str
    ) -> JoinInfo:
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            software_version=__version__,
            name=name,
            worker_id=worker_id,
            device=device_to_pb(device),
            peer=peer_to_pb(peer),
            token=token,
            session_public_key=self.session.public_bytes,
        )
        sent_at = time.time()
        r = self._call(
            lambda: self.stub.Join(request, timeout=self.timeout_s, wait_for_ready=True), "join", 120.0
        )
        self._count(request, r)
        self.session.session_id = r.session_id
        if r.server_time_unix:  # time stamps of signed calls must match the coordinator's clock
            self.session.clock_offset_s = r.server_time_unix - (sent_at + time.time()) / 2
        return JoinInfo(
            r.worker_id,
            r.run_id,
            r.run_spec_json,
            r.run_spec_sha256,
            r.round,
            r.state_checksum,
            r.lease_seconds,
            r.heartbeat_interval_seconds,
        )

    def heartbeat(self, worker_id: str, progress: Progress) -> tuple[str, int, str]:
        request = pb.HeartbeatRequest(worker_id=worker_id, progress=progress_to_pb(progress))
        try:
            r = self.stub.Heartbeat(
                request, timeout=self.timeout_s, metadata=self._signed("Heartbeat", request)
            )
        except grpc.RpcError as e:
            if e.code() not in _TRANSIENT:  # type: ignore[attr-defined]
                raise CoordinatorRefusedError(e.code(), e.details()) from None  # type: ignore[attr-defined]
            raise
        self._count(request, r)
        return _INSTRUCTIONS.get(r.instruction, "continue"), r.round, r.reason

    def leave(self, worker_id: str, reason: str) -> None:
        request = pb.LeaveRequest(worker_id=worker_id, reason=reason)
        self._count(
            request, self.stub.Leave(request, timeout=5.0, metadata=self._signed("Leave", request))
        )

    def report_round(
        self,
        *,
        worker_id: str,
        round_: int,
        tokens: int,
        inner_steps: int,
        loss: float,
        seconds: float,
        wait_s: float,
        pseudo_gradient_norm: float = 0.0,
    ) -> GroupAnswer:
        request = pb.ReportRoundRequest(
            worker_id=worker_id,
            round=round_,
            tokens=tokens,
            inner_steps=inner_steps,
            train_loss=loss,
            compute_seconds=seconds,
            pseudo_gradient_norm=pseudo_gradient_norm,
        )
        r = self._call(
            lambda: self.stub.ReportRound(
                request, timeout=wait_s, metadata=self._signed("ReportRound", request)
            ),
            "report",
            wait_s,
        )
        self._count(request, r)
        group = group_from_pb(r.group) if r.HasField("group") else None
        return GroupAnswer(r.accepted, r.reason, group, r.next_round)

    def commit_round(
        self,
        *,
        worker_id: str,
        round_: int,
        checksum: str,
        data_bytes: int,
        seconds: float,
        failed_spans: int,
        wait_s: float,
    ) -> CommitAnswer:
        request = pb.CommitRoundRequest(
            worker_id=worker_id,
            round=round_,
            checksum=checksum,
            data_plane_bytes=data_bytes,
            averaging_seconds=seconds,
            failed_spans=failed_spans,
        )
        r = self._call(
            lambda: self.stub.CommitRound(
                request, timeout=wait_s, metadata=self._signed("CommitRound", request)
            ),
            "commit",
            wait_s,
        )
        self._count(request, r)
        return CommitAnswer(_INSTRUCTIONS.get(r.instruction, "continue"), r.reason, r.next_round)

    def lease_data(self, worker_id: str, round_: int, index: int = 0) -> DataLease:
        request = pb.LeaseDataRequest(worker_id=worker_id, round=round_, index=index)
        r = self._call(
            lambda: self.stub.LeaseData(
                request, timeout=self.timeout_s, metadata=self._signed("LeaseData", request)
            ),
            "lease",
            120.0,
        )
        self._count(request, r)
        return DataLease(
            r.shard,
            r.num_shards,
            r.epoch,
            r.steps,
            r.round_full,
            r.reason,
            r.last,
            r.wait,
            r.retry_after_seconds,
        )

    def run_status(
        self, timeout_s: float | None = None, rounds_since: int | None = None, rounds_limit: int | None = None
    ) -> pb.RunStatus:
        """The run's status with a page of its round log: the newest `rounds_limit` rounds (the server's
        default page, 1000, when None), or the oldest ones from `rounds_since`."""
        request = pb.GetRunStatusRequest()
        if rounds_since is not None:
            request.rounds_since = rounds_since
        if rounds_limit is not None:
            request.rounds_limit = rounds_limit
        metadata = self._operator_metadata() or self._signed("GetRunStatus", request)
        return self.stub.GetRunStatus(request, timeout=timeout_s or self.timeout_s, metadata=metadata)

    # ---- operator RPCs (with the operator token in their metadata) ------------------------------

    def pause(self, reason: str = "") -> pb.OperatorResponse:
        return self.operator_call(self.stub.Pause, pb.PauseRequest(reason=reason))

    def resume(self) -> pb.OperatorResponse:
        return self.operator_call(self.stub.Resume, pb.ResumeRequest())

    def evict(self, worker_id: str, reason: str = "") -> pb.OperatorResponse:
        return self.operator_call(self.stub.Evict, pb.EvictRequest(worker_id=worker_id, reason=reason))

    def operator_call(self, method: Callable[..., T], request: Message) -> T:
        """One call with the operator token (stub method and request), errors mapped to ours."""
        try:
            return method(request, timeout=self.timeout_s, metadata=self._operator_metadata())
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if code in _TRANSIENT:
                raise CoordinatorUnreachableError(
                    f"the coordinator at {self.address} did not answer ({code.name}: {e.details()})"  # type: ignore[attr-defined]
                ) from None
            raise CoordinatorRefusedError(code, e.details()) from None  # type: ignore[attr-defined]

    def get_state(
        self,
        worker_id: str,
        min_round: int,
        wait_s: float,
        attempts: int = 4,
        cut_after_bytes: int | None = None,
    ) -> StateDownload:
        """Download the global state in verified chunks, resuming from the last good byte on failure.
        `cut_after_bytes` breaks the first attempt's stream there (fault injection for resume tests)."""
        buf, total, digest, round_, checksum, wire = bytearray(), -1, "", -1, "", 0
        for attempt in range(attempts):
            request = pb.GetStateRequest(worker_id=worker_id, min_round=min_round, offset=len(buf))
            try:
                metadata = self._signed("GetState", request)
                for chunk in self.stub.GetState(request, timeout=wait_s, metadata=metadata):
                    if digest and chunk.state_sha256 != digest:  # a newer state replaced it: start over
                        buf.clear()
                        digest = ""
                        raise StateDownloadError("the state changed during the download")
                    round_, total, digest, checksum = (
                        chunk.round,
                        chunk.total_bytes,
                        chunk.state_sha256,
                        chunk.checksum,
                    )
                    if chunk.offset != len(buf):
                        raise StateDownloadError(f"chunk at offset {chunk.offset}, expected {len(buf)}")
                    if hashlib.sha256(chunk.data).hexdigest() != chunk.chunk_sha256:
                        raise StateDownloadError(f"chunk at offset {chunk.offset} is corrupt")
                    buf.extend(chunk.data)
                    wire += chunk.ByteSize()
                    if self.on_bytes is not None:
                        self.on_bytes("state", 0, chunk.ByteSize())
                    if cut_after_bytes is not None and len(buf) >= cut_after_bytes:
                        cut_after_bytes = None
                        raise StateDownloadError(f"connection cut after {len(buf)} bytes (fault plan)")
                if len(buf) == total and hashlib.sha256(buf).hexdigest() == digest:
                    return StateDownload(round_, bytes(buf), checksum, wire)
                raise StateDownloadError(f"state incomplete or corrupt ({len(buf)}/{total} bytes)")
            except (grpc.RpcError, StateDownloadError) as e:
                if isinstance(e, grpc.RpcError) and e.code() in _REFUSALS:  # type: ignore[attr-defined]
                    raise CoordinatorRefusedError(e.code(), e.details()) from None  # type: ignore[attr-defined]
                if isinstance(e, StateDownloadError) and len(buf) == total:
                    buf.clear()  # complete but wrong: the whole thing is suspect
                log.warning("state download attempt %d failed: %s", attempt + 1, e)
                time.sleep(min(0.5 * 2**attempt, 5.0))
        raise StateDownloadError(f"could not download state of round ≥ {min_round} after {attempts} attempts")
