"""The coordinator's brain in one asyncio loop: it feeds events to the pure membership and round
machines, runs the coordinator's replica through each round's all-reduce, and wakes the RPCs that
long-poll on rounds. It knows nothing of gRPC; the servicer in `service` translates for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from antorcha.averaging.base import AllReduceResult, AveragingBackend, AveragingGroup, GroupMember
from antorcha.config import CoordinatorSettings, RunSpec
from antorcha.coordinator.membership import Membership, WorkerRecord
from antorcha.coordinator.replica import CoordinatorReplica
from antorcha.coordinator.rounds import Phase, Report, RoundMachine, assign_shard

log = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """What the operator sees of a finished round."""

    round: int
    workers: int = 0
    tokens: int = 0
    train_loss: float = math.nan
    eval_loss: float = math.nan
    data_plane_bytes: int = 0
    seconds: float = 0.0
    checksum: str = ""
    commits: dict[str, str] = field(default_factory=dict)  # worker id -> reported checksum
    failed_spans: int = 0

    @property
    def consistent(self) -> bool:
        return self.failed_spans == 0 and all(c == self.checksum for c in self.commits.values())


@dataclass(frozen=True)
class GroupOutcome:
    accepted: bool
    reason: str
    group: AveragingGroup | None
    next_round: int


@dataclass(frozen=True)
class CommitOutcome:
    resync: bool
    stop: bool
    reason: str
    next_round: int
    data_shard: int
    expected_checksum: str


class CoordinatorCore:
    def __init__(
        self,
        spec: RunSpec,
        settings: CoordinatorSettings,
        replica: CoordinatorReplica,
        backend: AveragingBackend,
    ) -> None:
        self.spec, self.settings, self.replica, self.backend = spec, settings, replica, backend
        self.members = Membership(settings.lease_s)
        self.rounds = RoundMachine(spec.max_rounds, spec.min_workers, spec.round_deadline_s)
        self.history: list[RoundLog] = []
        self.initial_eval_loss = math.nan
        self.state_bytes = 0
        self.control_plane_bytes = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica")
        self._group_ready: dict[int, asyncio.Future[AveragingGroup]] = {}
        self._round_closed: dict[int, asyncio.Future[str]] = {}
        self._state_changed = asyncio.Condition()
        self._last_reason = ""
        self._round_started = time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.initial_eval_loss = await self.in_replica(self.replica.evaluate)
        log.info("initial eval loss=%.4f params=%d", self.initial_eval_loss, self.replica.num_parameters)

    async def run_ticks(self) -> None:
        while True:
            self.tick(time.monotonic())
            await asyncio.sleep(self.settings.tick_interval_s)

    def tick(self, now: float) -> None:
        for worker_id, reason in self.members.expire(now):
            log.warning("lease expired worker=%s reason=%s", worker_id, reason)
        before = self.rounds.phase
        decision = self.rounds.tick(now, self._active_ids())
        if self.rounds.phase == Phase.TRAINING and before != Phase.TRAINING:
            self._round_started = now
        if decision.reason != self._last_reason:  # tick runs often; log only what changed
            log.info("round=%d phase=%s %s", self.rounds.round, self.rounds.phase, decision.reason)
            self._last_reason = decision.reason
        if decision.form_group:
            group = self._make_group(decision.members)
            self._future(self._group_ready, self.rounds.round).set_result(group)
            asyncio.get_running_loop().create_task(self._average(self.rounds.round, group))

    def _active_ids(self) -> set[str]:
        """Workers a round waits for: active and not on their way out."""
        return {r.worker_id for r in self.members.active() if not r.leaving}

    @staticmethod
    def _future(table: dict[int, asyncio.Future], round_: int) -> asyncio.Future:
        if round_ not in table:
            table[round_] = asyncio.get_running_loop().create_future()
            for old in [r for r in table if r < round_ - 4]:  # long-polls never look this far back
                del table[old]
        return table[round_]

    async def in_replica(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- rounds --------------------------------------------------------------------------------

    def _make_group(self, worker_ids: tuple[str, ...]) -> AveragingGroup:
        me = self.backend.peer
        members = [GroupMember(me.peer_id, me.maddrs, 0.0, 0.0 if me.client_mode else 1.0, "")]
        for worker_id in worker_ids:
            record = self.members.workers[worker_id]
            report = self.rounds.reports[worker_id]
            fraction = 0.0 if record.peer.client_mode else 1.0
            members.append(
                GroupMember(
                    record.peer.peer_id, record.peer.maddrs, float(report.tokens), fraction, worker_id
                )
            )
        group_id = f"{self.spec.run_id}.r{self.rounds.round}.{uuid.uuid4().hex[:8]}"
        return AveragingGroup(group_id, tuple(members), self.spec.codec, self.spec.allreduce_timeout_s)

    async def _average(self, round_: int, group: AveragingGroup) -> None:
        reports = dict(self.rounds.reports)
        entry = RoundLog(round=round_, workers=len(reports), tokens=sum(r.tokens for r in reports.values()))
        losses = [r.train_loss for r in reports.values() if math.isfinite(r.train_loss)]
        entry.train_loss = sum(losses) / len(losses) if losses else math.nan
        zeros = torch.zeros(self.replica.num_parameters)
        try:
            result = await self.in_replica(self.backend.all_reduce, group, zeros, 0.0)
        except Exception:  # the round must close whatever the data plane did; workers resync
            log.exception("round=%d all-reduce failed on the coordinator; no update this round", round_)
            result = AllReduceResult(average=zeros, failed_spans=len(group.members))
        entry.failed_spans = result.failed_spans
        entry.data_plane_bytes += result.bytes_total
        try:
            entry.checksum = await self.in_replica(self.replica.apply, result.average)
        except ValueError as e:  # a non-finite average never reaches the model
            log.error("round=%d average rejected: %s; parameters left unchanged", round_, e)
            entry.checksum = self.replica.checksum
        entry.seconds = time.monotonic() - self._round_started
        for worker_id in reports:
            if worker_id in self.members.workers:
                self.members.workers[worker_id].rounds_contributed += 1
        self.history.append(entry)
        for worker_id in self.members.apply_leaves():
            log.info("worker left at round boundary worker=%s round=%d", worker_id, round_)
        now = time.monotonic()
        reason = self.rounds.close(now, self._active_ids())
        self._round_started = now
        log.info("round=%d closed tokens=%d checksum=%s %s", round_, entry.tokens, entry.checksum, reason)
        self._future(self._round_closed, round_).set_result(entry.checksum)
        async with self._state_changed:
            self._state_changed.notify_all()
        entry.eval_loss = await self.in_replica(self.replica.evaluate)
        log.info("round=%d eval_loss=%.4f", round_, entry.eval_loss)

    # ---- what the RPCs ask -------------------------------------------------------------------

    def join(self, **kwargs) -> tuple[WorkerRecord, str]:  # type: ignore[no-untyped-def]
        record, reason = self.members.join(now=time.monotonic(), **kwargs)
        log.info("join %s", reason)
        return record, reason

    def current_shard(self, worker_id: str, round_: int) -> int:
        active = self.members.active()
        rank = next((i for i, r in enumerate(active) if r.worker_id == worker_id), 0)
        return assign_shard(round_, rank, len(active), self.spec.num_data_shards)

    def start_round_for_joiner(self) -> int:
        """A joiner trains in the round after the latest finished one (it downloads that state)."""
        return self.replica.state.round

    async def report(self, worker_id: str, round_: int, report: Report, wait_s: float) -> GroupOutcome:
        self.members.touch(worker_id, time.monotonic())
        accepted, reason = self.rounds.report(round_, report)
        if not accepted:
            return GroupOutcome(False, reason, None, self.rounds.round)
        self.tick(time.monotonic())  # the last report forms the group at once
        try:
            group = await asyncio.wait_for(asyncio.shield(self._future(self._group_ready, round_)), wait_s)
        except TimeoutError:
            return GroupOutcome(False, "no group was formed in time", None, self.rounds.round)
        if worker_id not in {m.worker_id for m in group.members}:
            return GroupOutcome(False, "the group was formed without you", None, round_ + 1)
        return GroupOutcome(True, "group formed", group, round_ + 1)

    async def commit(
        self, worker_id: str, round_: int, checksum: str, data_bytes: int, wait_s: float
    ) -> CommitOutcome:
        self.members.touch(worker_id, time.monotonic())
        expected = await asyncio.wait_for(asyncio.shield(self._future(self._round_closed, round_)), wait_s)
        entry = next((h for h in reversed(self.history) if h.round == round_), None)
        if entry is not None:
            entry.commits[worker_id] = checksum
            entry.data_plane_bytes += data_bytes
        stop = self.rounds.phase == Phase.FINISHED
        next_round = round_ + 1
        shard = self.current_shard(worker_id, next_round)
        if checksum != expected:
            log.warning(
                "checksum mismatch worker=%s round=%d got=%s want=%s", worker_id, round_, checksum, expected
            )
            return CommitOutcome(
                True, stop, "checksum differs from the coordinator's replica", next_round, shard, expected
            )
        reason = "run finished" if stop else "ok"
        return CommitOutcome(False, stop, reason, next_round, shard, expected)

    async def wait_for_state(self, min_round: int, wait_s: float) -> None:
        async with self._state_changed:
            await asyncio.wait_for(
                self._state_changed.wait_for(lambda: self.replica.state.round >= min_round), wait_s
            )

    @property
    def finished(self) -> bool:
        return self.rounds.phase == Phase.FINISHED

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
