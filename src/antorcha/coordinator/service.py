"""The gRPC servicer: validates each request, translates it for `CoordinatorCore`, and maps errors to
status codes with a message a person can act on. Every byte it moves is counted as control-plane
traffic, except state downloads, which are counted apart. Every refusal is counted by reason
(`antorcha_rejected_requests_total`) and shown among the dashboard's events.

Every call first passes `guard_call` (registered by `rpc_handlers`): a request that is not valid
protobuf is refused INVALID_ARGUMENT; then rate limits and, when auth is on, the join token, the
worker's signed session or the operator token (see `antorcha.security.guard`). A worker whose join token
was revoked is evicted at its next call, so it drops out of the next round.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from google.protobuf.message import Message

from antorcha import PROTOCOL_VERSION, __version__
from antorcha.coordinator.core import CoordinatorCore, RoundLog
from antorcha.coordinator.host import RunHost
from antorcha.coordinator.membership import UnknownWorkerError, WorkerRecord, WorkerState
from antorcha.coordinator.queue_service import RunQueueMethods
from antorcha.coordinator.rounds import Phase, Report
from antorcha.coordinator.rpc_handlers import Incoming
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.proto.antorcha.v1 import coordinator_pb2_grpc as pb_grpc
from antorcha.protocol import (
    device_from_pb,
    device_to_pb,
    group_to_pb,
    peer_from_pb,
    progress_from_pb,
    progress_to_pb,
)
from antorcha.security.guard import METHOD_KINDS, MethodKind, Refusal, RequestGuard
from antorcha.security.signing import metadata_dict

log = logging.getLogger(__name__)

_MAX_NAME = 128
_MAX_MADDRS = 16
_MAX_TOKENS_PER_REPORT = 10**12
_MAX_REASON = 500
DEFAULT_ROUNDS_PAGE = 1000  # rounds in a GetRunStatus answer that does not ask for a page
MAX_ROUNDS_PAGE = 10_000


class CoordinatorService(RunQueueMethods, pb_grpc.CoordinatorServicer):
    def __init__(self, host: RunHost, bootstrap_maddrs: list[str], guard: RequestGuard) -> None:
        self.host = host
        self.bootstrap_maddrs = bootstrap_maddrs
        self.guard = guard

    @property
    def core(self) -> CoordinatorCore:
        """The core of the run being trained (it changes when the host moves to the next queued run)."""
        assert self.host.core is not None, "the host opens a run before the server starts"
        return self.host.core

    def _count(self, request: object, response: object) -> None:
        received, sent = request.ByteSize(), response.ByteSize()  # type: ignore[attr-defined]
        self.core.control_plane_bytes += received + sent
        self.core.telemetry.control_bytes(sent, received)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        worker_id: str = "",
    ) -> NoReturn:
        """Count the refusal under `reason` (one of dashboard.metrics.REJECT_REASONS), then abort."""
        self.core.telemetry.reject(reason, message, worker_id, self.core.rounds.round)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def _active(self, worker_id: str, context: grpc.aio.ServicerContext) -> None:
        evicted = self.core.operator.refusal(worker_id)
        if evicted:
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "evicted", evicted, worker_id)
        try:
            self.core.members.get_active(worker_id)
        except UnknownWorkerError:
            await self._refuse(
                context,
                grpc.StatusCode.NOT_FOUND,
                "unknown_worker",
                f"unknown or inactive worker {worker_id!r}; join again",
                worker_id,
            )

    async def guard_call(self, method: str, incoming: Incoming, context: grpc.aio.ServicerContext) -> Message:
        """Decode errors, rate limits and auth, before any method runs; returns the decoded request."""
        request = incoming.message
        if request is None:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "malformed",
                f"the {method} request is not a valid protobuf message ({incoming.error}); "
                "build the client from proto/antorcha/v1",
            )
        kind = METHOD_KINDS.get(method, MethodKind.OPERATOR)
        worker_id = getattr(request, "worker_id", "") if kind == MethodKind.WORKER else ""
        metadata = metadata_dict(context.invocation_metadata())
        try:
            self.guard.rate_limit(method, _client_address(context.peer()), worker_id)
            if kind == MethodKind.WORKER:
                self.guard.check_worker_call(method, metadata, incoming.raw, worker_id)
            elif kind == MethodKind.OPERATOR:
                self.guard.check_operator(metadata)
            elif kind == MethodKind.READ:
                self.guard.check_read(method, metadata, incoming.raw)
        except Refusal as refusal:
            for revoked_id, why in self.guard.drain_revoked():
                self._revoked(revoked_id, why)
            await self._refuse(
                context, grpc.StatusCode[refusal.code], refusal.reason, refusal.message, worker_id
            )
        assert request is not None
        return request

    def _revoked(self, worker_id: str, why: str) -> None:
        if worker_id in self.core.members.workers:
            self.core.operator.evict(worker_id, why)
            self.core.tick(time.monotonic())  # a round that only waited for it can form its group now

    async def Discover(
        self, request: pb.DiscoverRequest, context: grpc.aio.ServicerContext
    ) -> pb.DiscoverResponse:
        response = pb.DiscoverResponse(
            protocol_version=PROTOCOL_VERSION,
            software_version=__version__,
            run_id=self.core.spec.run_id,
            bootstrap_maddrs=self.bootstrap_maddrs,
            tokens_required=self.guard.enabled,
            run_active=not self.core.finished,
            serves_queue=self.host.serves_queue,
        )
        self._count(request, response)
        return response

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if request.protocol_version != PROTOCOL_VERSION:
            await self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "protocol_version",
                f"protocol version {request.protocol_version} is not supported; this coordinator speaks "
                f"{PROTOCOL_VERSION} (antorcha {__version__}); upgrade the worker",
            )
        if len(request.name) > _MAX_NAME:
            await self._refuse(
                context, invalid, "invalid_argument", f"name longer than {_MAX_NAME} characters"
            )
        if not request.peer.peer_id or len(request.peer.maddrs) > _MAX_MADDRS:
            await self._refuse(
                context, invalid, "invalid_argument", "peer info needs a peer_id and ≤16 maddrs"
            )
        if not request.peer.client_mode and not request.peer.maddrs:
            await self._refuse(
                context,
                invalid,
                "invalid_argument",
                "a peer that is not in client mode must announce maddrs",
            )
        evicted = self.core.operator.refusal(request.worker_id) if request.worker_id else ""
        if evicted:
            await self._refuse(
                context, grpc.StatusCode.PERMISSION_DENIED, "evicted", evicted, request.worker_id
            )
        if self.core.finished:
            await self._refuse(
                context, grpc.StatusCode.FAILED_PRECONDITION, "run_finished", "the run is finished"
            )
        try:
            token = self.guard.admit_join(request.token, request.session_public_key)
        except Refusal as refusal:
            await self._refuse(context, grpc.StatusCode[refusal.code], refusal.reason, refusal.message)
        record, _ = self.core.join(
            name=request.name,
            peer=peer_from_pb(request.peer),
            device=device_from_pb(request.device),
            worker_id=request.worker_id,
        )
        start_round = self.core.start_round_for_joiner()
        spec = self.core.spec
        response = pb.JoinResponse(
            worker_id=record.worker_id,
            lease_seconds=self.core.settings.lease_s,
            heartbeat_interval_seconds=self.core.settings.heartbeat_interval_s,
            run_id=spec.run_id,
            run_spec_json=spec.model_dump_json(),
            run_spec_sha256=spec.sha256(),
            bootstrap_maddrs=self.bootstrap_maddrs,
            round=start_round,
            state_checksum=self.core.replica.checksum,
            server_time_unix=time.time(),
        )
        session = self.guard.open_session(record.worker_id, token, request.session_public_key)
        if session is not None:
            response.session_id = session.session_id
            response.session_ttl_seconds = self.guard.settings.session_ttl_s
        self._count(request, response)
        return response

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        await self._active(request.worker_id, context)
        self.core.members.heartbeat(request.worker_id, progress_from_pb(request.progress), time.monotonic())
        instruction, reason = pb.CONTINUE, ""
        if self.core.finished:
            instruction, reason = pb.STOP, "the run is finished"
        response = pb.HeartbeatResponse(
            instruction=instruction,
            round=self.core.rounds.round,
            lease_seconds=self.core.settings.lease_s,
            reason=reason,
            session_ttl_seconds=self.guard.settings.session_ttl_s if self.guard.enabled else 0.0,
        )
        self._count(request, response)
        return response

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        reason = self.core.leave(request.worker_id)
        log.info("leave %s (%s)", reason, request.reason[:200])
        response = pb.LeaveResponse()
        self._count(request, response)
        return response

    async def ReportRound(
        self, request: pb.ReportRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportRoundResponse:
        await self._active(request.worker_id, context)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not 0 < request.tokens <= _MAX_TOKENS_PER_REPORT:
            await self._refuse(
                context,
                invalid,
                "invalid_argument",
                f"tokens must be in 1..{_MAX_TOKENS_PER_REPORT}",
                request.worker_id,
            )
        if math.isinf(request.train_loss) or not 0 <= request.compute_seconds < math.inf:
            await self._refuse(
                context,
                invalid,
                "invalid_argument",
                "train_loss must be finite (or NaN), seconds ≥ 0",
                request.worker_id,
            )
        # Trust (issue 6): a non-finite declared ‖Δ‖ or an impossible token claim is refused here.
        refusal, label = self.core.screen_report(
            request.worker_id,
            request.round,
            request.tokens,
            request.compute_seconds,
            request.pseudo_gradient_norm,
        )
        if refusal:
            await self._refuse(context, invalid, label, refusal, request.worker_id)
        report = Report(
            request.worker_id,
            request.tokens,
            request.inner_steps,
            request.train_loss,
            request.compute_seconds,
        )
        wait_s = self.core.spec.round_deadline_s + 10
        outcome = await self.core.report(request.worker_id, request.round, report, wait_s)
        if outcome.accepted:
            self.core.telemetry.report(
                request.worker_id, request.round, request.tokens, request.compute_seconds
            )
        else:
            self.core.telemetry.reject(
                "late_report", f"report of round {request.round}: {outcome.reason}", request.worker_id
            )
        response = pb.ReportRoundResponse(
            accepted=outcome.accepted, reason=outcome.reason, next_round=outcome.next_round
        )
        if outcome.group is not None:
            response.group.CopyFrom(group_to_pb(outcome.group))
        self._count(request, response)
        return response

    async def CommitRound(
        self, request: pb.CommitRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitRoundResponse:
        await self._active(request.worker_id, context)
        if not request.checksum:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid_argument",
                "checksum is required",
                request.worker_id,
            )
        if math.isfinite(request.averaging_seconds) and request.averaging_seconds >= 0:
            self.core.telemetry.commit(request.worker_id, request.round, request.averaging_seconds)
        try:
            outcome = await self.core.commit(
                request.worker_id,
                request.round,
                request.checksum,
                request.data_plane_bytes,
                wait_s=2 * self.core.spec.allreduce_timeout_s + 30,
            )
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"round {request.round} did not close in time"
            )
        instruction = pb.STOP if outcome.stop else (pb.RESYNC if outcome.resync else pb.CONTINUE)
        response = pb.CommitRoundResponse(
            instruction=instruction,
            reason=outcome.reason,
            next_round=outcome.next_round,
            expected_checksum=outcome.expected_checksum,
        )
        self._count(request, response)
        return response

    async def LeaseData(
        self, request: pb.LeaseDataRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseDataResponse:
        await self._active(request.worker_id, context)
        outcome = self.core.lease_data(request.worker_id, request.round, request.index)
        response = pb.LeaseDataResponse(
            num_shards=self.core.ledger.num_shards,
            round_full=outcome.lease is None,
            reason=outcome.reason,
            last=outcome.last,
            wait=outcome.wait,
            retry_after_seconds=1.0 if outcome.wait else 0.0,
        )
        if outcome.lease is not None:
            response.shard, response.epoch, response.steps = (
                outcome.lease.shard,
                outcome.lease.epoch,
                outcome.steps,
            )
        self._count(request, response)
        return response

    async def GetState(
        self, request: pb.GetStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StateChunk]:
        try:
            await self.core.wait_for_state(request.min_round, wait_s=self.core.spec.round_deadline_s + 60)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no state of round ≥ {request.min_round} yet"
            )
        round_, data, digest, checksum = await self.core.in_replica(self.core.replica.encoded)
        if request.offset > len(data):
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} > state size {len(data)}"
            )
        step = self.core.settings.state_chunk_bytes
        for offset in range(request.offset, len(data), step):
            piece = data[offset : offset + step]
            chunk = pb.StateChunk(
                round=round_,
                offset=offset,
                data=piece,
                chunk_sha256=hashlib.sha256(piece).hexdigest(),
                total_bytes=len(data),
                state_sha256=digest,
                checksum=checksum,
            )
            self.core.state_bytes += chunk.ByteSize()
            self.core.telemetry.state_bytes(chunk.ByteSize())
            yield chunk

    async def GetRunStatus(
        self, request: pb.GetRunStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        since = request.rounds_since if request.HasField("rounds_since") else None
        limit = request.rounds_limit if request.HasField("rounds_limit") else DEFAULT_ROUNDS_PAGE
        response = run_status(self.core, rounds_since=since, rounds_limit=limit)
        self._count(request, response)
        return response

    async def Pause(self, request: pb.PauseRequest, context: grpc.aio.ServicerContext) -> pb.OperatorResponse:
        changed, message = self.core.operator.pause(request.reason[:_MAX_REASON])
        response = pb.OperatorResponse(changed=changed, message=message)
        self._count(request, response)
        return response

    async def Resume(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperatorResponse:
        changed, message = self.core.operator.resume()
        self.core.tick(time.monotonic())  # open the round now rather than at the next tick
        response = pb.OperatorResponse(changed=changed, message=message)
        self._count(request, response)
        return response

    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.OperatorResponse:
        if request.worker_id not in self.core.members.workers:
            await self._refuse(
                context,
                grpc.StatusCode.NOT_FOUND,
                "unknown_worker",
                f"no worker {request.worker_id!r} in run {self.core.spec.run_id!r}; "
                "see `antorcha workers` for the ids",
            )
        changed, message = self.core.operator.evict(request.worker_id, request.reason[:_MAX_REASON])
        self.guard.drop_worker(request.worker_id)
        self.core.tick(time.monotonic())  # a round that only waited for it can form its group now
        response = pb.OperatorResponse(changed=changed, message=message)
        self._count(request, response)
        return response


def _client_address(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' → '1.2.3.4', 'ipv6:[::1]:5678' → '::1' (the port changes per connection)."""
    _, _, rest = peer.partition(":")
    host, _, _ = rest.rpartition(":")
    return host.strip("[]") or peer


def rounds_page(core: CoordinatorCore, since: int | None, limit: int) -> list[RoundLog]:
    """A page of the round log: the oldest `limit` rounds ≥ `since`, or the newest `limit` rounds."""
    history, limit = core.history, max(0, min(limit, MAX_ROUNDS_PAGE))
    if limit == 0:
        return []
    if since is None:
        return history[-limit:]
    start = bisect.bisect_left(history, since, key=lambda h: h.round)  # the log is ordered by round
    return history[start : start + limit]


def _worker_state(core: CoordinatorCore, r: WorkerRecord) -> str:
    if r.state != WorkerState.ACTIVE:
        return str(r.state)
    if core.rounds.phase in (Phase.WAITING, Phase.PAUSED):
        return "waiting"
    return "averaging" if r.worker_id in core.rounds.reports else "training"


def run_status(
    core: CoordinatorCore, rounds_since: int | None = None, rounds_limit: int = DEFAULT_ROUNDS_PAGE
) -> pb.RunStatus:
    """The run as an operator sees it, with a page of the round log (see GetRunStatusRequest)."""
    now = time.monotonic()
    history = core.history
    evaluated = next((h.eval_loss for h in reversed(history) if math.isfinite(h.eval_loss)), math.nan)
    active = core.members.active()
    tokens, data_plane_bytes, consistent = core.telemetry.history_totals(history)
    status = pb.RunStatus(
        run_id=core.spec.run_id,
        round=core.rounds.round,
        phase=str(core.rounds.phase),
        max_rounds=core.spec.max_rounds,
        initial_eval_loss=core.initial_eval_loss,
        tokens=tokens,
        data_plane_bytes=data_plane_bytes,
        state_bytes=core.state_bytes,
        control_plane_bytes=core.control_plane_bytes,
        replicas_consistent=consistent,
        joins=core.counters.joins,
        leaves=core.counters.leaves,
        crashes=core.counters.crashes,
        resyncs=core.counters.resyncs,
        restarts=core.counters.restarts,
        epoch=core.ledger.epoch,
        shards_trained=len(core.ledger.trained),
        num_data_shards=core.ledger.num_shards,
        paused=core.rounds.paused,
        rounds_total=len(history),
        train_loss=history[-1].train_loss if history else math.nan,
        eval_loss=evaluated,
        tokens_per_second=sum(r.progress.tokens_per_second for r in active),
        evictions=core.operator.evictions,
        rejected_requests=core.telemetry.rejected,
    )
    for r in core.members.workers.values():
        status.workers.append(
            pb.WorkerStatus(
                worker_id=r.worker_id,
                name=r.name,
                state=_worker_state(core, r),
                device=device_to_pb(r.device),
                rounds_contributed=r.rounds_contributed,
                seconds_since_heartbeat=now - r.last_seen,
                progress=progress_to_pb(r.progress),
                tokens=core.telemetry.worker_tokens.get(r.worker_id, 0),
                detail=core.operator.evicted.get(r.worker_id, ""),
            )
        )
    for h in rounds_page(core, rounds_since, rounds_limit):
        status.rounds.append(
            pb.RoundRecord(
                round=h.round,
                workers=h.workers,
                tokens=h.tokens,
                train_loss=h.train_loss,
                eval_loss=h.eval_loss,
                data_plane_bytes=h.data_plane_bytes,
                seconds=h.seconds,
                replicas_consistent=h.consistent,
                checksum=h.checksum,
            )
        )
    return status
