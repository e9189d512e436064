"""The run-queue RPCs of the coordinator's servicer (SubmitRun, ListRuns, CancelRun), mixed into
`service.CoordinatorService`. Who may call them is decided first by the request guard (operator token
for submit and cancel)."""

from __future__ import annotations

import logging

import grpc
from pydantic import ValidationError

from antorcha.config import RunSpec
from antorcha.coordinator.host import RunHost
from antorcha.coordinator.runs import DuplicateRunError, RunEntry
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
_MAX_REASON = 500
_MAX_SPEC_BYTES = 1_000_000


def run_entry_to_pb(entry: RunEntry) -> pb.RunEntry:
    return pb.RunEntry(
        run_id=entry.run_id,
        state=str(entry.state),
        position=entry.position,
        submitted_unix=entry.submitted_unix,
        started_unix=entry.started_unix,
        finished_unix=entry.finished_unix,
        detail=entry.detail,
        summary_json=entry.summary_json,
        run_spec_json=entry.spec_json,
    )


class RunQueueMethods:
    """SubmitRun, ListRuns, CancelRun (mixed into CoordinatorService)."""

    host: RunHost

    async def SubmitRun(self, request: pb.SubmitRunRequest, context: grpc.aio.ServicerContext) -> pb.RunEntry:
        if len(request.run_spec_json) > _MAX_SPEC_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run spec larger than 1 MB")
        try:
            spec = RunSpec.model_validate_json(request.run_spec_json)
        except ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _spec_error(e))
        try:
            entry = self.host.queue.submit(spec.run_id, spec.model_dump_json())
        except DuplicateRunError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        log.info("run %s queued at position %d", entry.run_id, entry.position)
        return run_entry_to_pb(entry)

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.RunList:
        current = self.host.core.spec.run_id if self.host.core is not None else ""
        return pb.RunList(runs=[run_entry_to_pb(e) for e in self.host.queue.all()], current_run_id=current)

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperatorResponse:
        if self.host.queue.get(request.run_id) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r}; see `antorcha run list`"
            )
        changed, message = self.host.cancel(request.run_id, request.reason[:_MAX_REASON])
        return pb.OperatorResponse(changed=changed, message=message)


def _spec_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "spec"
    return f"run spec field {where!r}: {first['msg']} ({e.error_count()} error(s) in all)"


