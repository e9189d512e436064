"""The gRPC servicer: validates each request, translates it for `CoordinatorCore`, and maps errors to
status codes with a message a person can act on. Every byte it moves is counted as control-plane
traffic, except state downloads, which are counted apart."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc

from antorcha import PROTOCOL_VERSION, __version__
from antorcha.coordinator.core import CoordinatorCore
from antorcha.coordinator.membership import UnknownWorkerError, WorkerState
from antorcha.coordinator.rounds import Report
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

log = logging.getLogger(__name__)

_MAX_NAME = 128
_MAX_MADDRS = 16
_MAX_TOKENS_PER_REPORT = 10**12


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, core: CoordinatorCore, bootstrap_maddrs: list[str]) -> None:
        self.core = core
        self.bootstrap_maddrs = bootstrap_maddrs

    def _count(self, request: object, response: object) -> None:
        self.core.control_plane_bytes += request.ByteSize() + response.ByteSize()  # type: ignore[attr-defined]

    async def _active(self, worker_id: str, context: grpc.aio.ServicerContext) -> None:
        try:
            self.core.members.get_active(worker_id)
        except UnknownWorkerError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown or inactive worker {worker_id!r}; join again"
            )

    async def Discover(
        self, request: pb.DiscoverRequest, context: grpc.aio.ServicerContext
    ) -> pb.DiscoverResponse:
        response = pb.DiscoverResponse(
            protocol_version=PROTOCOL_VERSION,
            software_version=__version__,
            run_id=self.core.spec.run_id,
            bootstrap_maddrs=self.bootstrap_maddrs,
        )
        self._count(request, response)
        return response

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        if request.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported; this coordinator speaks "
                f"{PROTOCOL_VERSION} (antorcha {__version__}); upgrade the worker",
            )
        if len(request.name) > _MAX_NAME:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"name longer than {_MAX_NAME} characters")
        if not request.peer.peer_id or len(request.peer.maddrs) > _MAX_MADDRS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "peer info needs a peer_id and ≤16 maddrs")
        if not request.peer.client_mode and not request.peer.maddrs:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a peer that is not in client mode must announce maddrs"
            )
        if self.core.finished:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the run is finished")
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
        )
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
        if not 0 < request.tokens <= _MAX_TOKENS_PER_REPORT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"tokens must be in 1..{_MAX_TOKENS_PER_REPORT}"
            )
        if math.isinf(request.train_loss) or request.compute_seconds < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "train_loss must be finite (or NaN), seconds ≥ 0"
            )
        report = Report(
            request.worker_id,
            request.tokens,
            request.inner_steps,
            request.train_loss,
            request.compute_seconds,
        )
        wait_s = self.core.spec.round_deadline_s + 10
        outcome = await self.core.report(request.worker_id, request.round, report, wait_s)
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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "checksum is required")
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
        round_, data, digest = await self.core.in_replica(self.core.replica.encoded)
        checksum = self.core.replica.checksum if round_ == self.core.replica.state.round else ""
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
            yield chunk

    async def GetRunStatus(
        self, request: pb.GetRunStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        response = run_status(self.core)
        self._count(request, response)
        return response


def run_status(core: CoordinatorCore) -> pb.RunStatus:
    now = time.monotonic()
    status = pb.RunStatus(
        run_id=core.spec.run_id,
        round=core.rounds.round,
        phase=str(core.rounds.phase),
        max_rounds=core.spec.max_rounds,
        initial_eval_loss=core.initial_eval_loss,
        tokens=sum(h.tokens for h in core.history),
        data_plane_bytes=sum(h.data_plane_bytes for h in core.history),
        state_bytes=core.state_bytes,
        control_plane_bytes=core.control_plane_bytes,
        replicas_consistent=all(h.consistent for h in core.history),
        joins=core.counters.joins,
        leaves=core.counters.leaves,
        crashes=core.counters.crashes,
        resyncs=core.counters.resyncs,
        restarts=core.counters.restarts,
        epoch=core.ledger.epoch,
        shards_trained=len(core.ledger.trained),
        num_data_shards=core.ledger.num_shards,
    )
    for r in core.members.workers.values():
        state = str(r.state)
        if r.state == WorkerState.ACTIVE:
            state = "averaging" if r.worker_id in core.rounds.reports else "training"
        status.workers.append(
            pb.WorkerStatus(
                worker_id=r.worker_id,
                name=r.name,
                state=state,
                device=device_to_pb(r.device),
                rounds_contributed=r.rounds_contributed,
                seconds_since_heartbeat=now - r.last_seen,
                progress=progress_to_pb(r.progress),
            )
        )
    for h in core.history:
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
