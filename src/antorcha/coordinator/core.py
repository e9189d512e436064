"""The coordinator's brain in one asyncio loop: it feeds events to the pure membership, round and
data-ledger machines, runs the coordinator's replica through each round's all-reduce, persists what
must survive a crash, and wakes the RPCs that long-poll on rounds. It knows nothing of gRPC.

Order at the end of a round (what makes a restart lose nothing and count nothing twice): all-reduce →
outer step on the replica → the round's row, trained shards and worker stats in one transaction →
checkpoint file → only then are workers' commits answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from antorcha.averaging.base import AllReduceResult, AveragingBackend, AveragingGroup
from antorcha.averaging.reducer import ReduceSession
from antorcha.averaging.robust import AggregationPolicy
from antorcha.config import CoordinatorSettings, RunSpec
from antorcha.coordinator.budget import BudgetView, next_shard_refusal
from antorcha.coordinator.checkpoints import CheckpointStore, CheckpointWriteError
from antorcha.coordinator.claims import Claim, claim_refusal
from antorcha.coordinator.grouping import make_group
from antorcha.coordinator.hygiene import NormTracker
from antorcha.coordinator.ledger import DataLedger, Lease
from antorcha.coordinator.membership import Membership, WorkerRecord, WorkerState
from antorcha.coordinator.operator import OperatorControls
from antorcha.coordinator.replica import CoordinatorReplica
from antorcha.coordinator.rounds import Phase, Report, RoundMachine
from antorcha.coordinator.store import RunStore
from antorcha.coordinator.telemetry import Telemetry
from antorcha.coordinator.verifier import SpotChecker, judge, measure, should_check
from antorcha.data.source import load_run_data, shard_reader
from antorcha.diloco.params import ParamLayout
from antorcha.diloco.state import decode_state
from antorcha.model.factory import build_run_model

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        """Every replica that committed holds the coordinator's θ. (A failed span is a degraded round,
        skipped alike by every replica, not an inconsistent one.)"""
        return all(c == self.checksum for c in self.commits.values())


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
    expected_checksum: str


@dataclass(frozen=True)
class LeaseOutcome:
    lease: Lease | None  # None: the round is full (or not open) for this worker; report what it trained
    steps: int
    reason: str
    last: bool = False  # no further shard will follow in this round (saves the worker one RPC)
    wait: bool = False  # the round is not open yet (paused, or waiting for workers): ask again later


@dataclass
class Counters:
    joins: int = 0
    leaves: int = 0
    crashes: int = 0
    resyncs: int = 0
    restarts: int = 0


class CoordinatorCore:
    def __init__(
        self,
        spec: RunSpec,
        settings: CoordinatorSettings,
        replica: CoordinatorReplica,
        backend: AveragingBackend,
        store: RunStore | None = None,
        checkpoints: CheckpointStore | None = None,
    ) -> None:
        self.spec, self.settings, self.replica, self.backend = spec, settings, replica, backend
        self.store, self.checkpoints = store, checkpoints
        self.members = Membership(settings.lease_s)
        self.rounds = RoundMachine(spec.max_rounds, spec.min_workers, spec.round_deadline_s)
        self.ledger = DataLedger(replica.num_data_shards, seed=spec.seed)
        self.history: list[RoundLog] = []
        self.counters = Counters()
        self.initial_eval_loss = math.nan
        self.state_bytes = 0
        self.control_plane_bytes = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica")
        self._group_ready: dict[int, asyncio.Future[AveragingGroup]] = {}
        self._round_closed: dict[int, asyncio.Future[str]] = {}
        self._state_changed = asyncio.Condition()
        self._last_reason = ""
        self._round_started = time.monotonic()
        self._last_lease_at: dict[str, tuple[int, float]] = {}  # worker -> (round, time of its last lease)
        self.shard_seconds: dict[str, float] = {}  # worker -> measured seconds to train one shard
        self.telemetry = Telemetry(store)  # events, timings and metrics for the operator surface
        self.operator = OperatorControls(self)  # pause, resume, evict
        self._init_trust()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        resumed = self.store is not None and self.store.bind_run(
            self.spec.model_dump_json(), self.spec.sha256()
        )
        if resumed:
            await self._restore()
        if math.isnan(self.initial_eval_loss):
            self.initial_eval_loss = await self.in_replica(self.replica.evaluate)
        if self.store is not None:
            self.store.set_meta("initial_eval_loss", repr(self.initial_eval_loss))
        if self.checkpoints is not None and self.checkpoints.latest_round() is None:
            await self._checkpoint()  # θ_0, so a restart before round 0 ends finds the same start
        log.info(
            "coordinator ready round=%d params=%d shards=%d initial_eval_loss=%.4f resumed=%s",
            self.rounds.round,
            self.replica.num_parameters,
            self.ledger.num_shards,
            self.initial_eval_loss,
            resumed,
        )

    async def _restore(self) -> None:
        assert self.store is not None
        loaded = None
        if self.checkpoints is not None:
            layout, run_id = self.replica.layout, self.spec.run_id
            loaded = await self.in_replica(
                self.checkpoints.load_latest, lambda b: decode_state(layout, b, run_id)
            )
        start_round = 0
        if loaded is not None:
            info, state = loaded
            self.replica.restore(state)
            start_round = state.round
            self.telemetry.checkpointed(info.created_at)
            log.info(
                "restored checkpoint round=%d path=%s checksum=%s", state.round, info.path, info.checksum
            )
        dropped = self.store.truncate_after(start_round)
        if dropped:
            log.warning(
                "dropped %d round rows past the newest valid checkpoint (round %d)", dropped, start_round
            )
        self.history = [self._round_from_row(row) for row in self.store.load_rounds()]
        last = self.history[-1] if self.history else None
        if last is not None and last.round == start_round - 1 and last.checksum == self.replica.checksum:
            # Killed after the checkpoint of round r but before the workers' commits of r were answered:
            # those commits still get their answer, rather than a needless download of the same state.
            self._future(self._round_closed, last.round).set_result(last.checksum)
        self.store.load_members(self.members, time.monotonic())
        self.store.load_ledger(self.ledger)
        self.store.load_leases(self.ledger)
        self.rounds.round = start_round
        if self.spec.max_rounds and start_round >= self.spec.max_rounds:
            self.rounds.phase = Phase.FINISHED
        initial = self.store.get_meta("initial_eval_loss")
        self.initial_eval_loss = float(initial) if initial is not None else math.nan
        counts = self.store.event_counts()
        self.counters = Counters(
            joins=counts.get("join", 0),
            leaves=counts.get("leave", 0),
            crashes=counts.get("crash", 0),
            resyncs=counts.get("resync", 0),
            restarts=counts.get("restart", 0) + 1,
        )
        self.state_bytes = int(self.store.get_meta("state_bytes") or 0)
        self.control_plane_bytes = int(self.store.get_meta("control_plane_bytes") or 0)
        self.telemetry.restore(start_round)
        self.operator.restore()
        self.telemetry.event("restart", round_=start_round, detail=f"resumed at round {start_round}")

    @staticmethod
    def _round_from_row(row: dict[str, Any]) -> RoundLog:
        entry = RoundLog(
            round=row["round"],
            workers=row["workers"],
            tokens=row["tokens"],
            train_loss=math.nan if row["train_loss"] is None else row["train_loss"],
            eval_loss=math.nan if row["eval_loss"] is None else row["eval_loss"],
            data_plane_bytes=row["data_plane_bytes"],
            seconds=row["seconds"],
            checksum=row["checksum"],
            failed_spans=row["failed_spans"],
        )
        if not row["consistent"]:
            entry.commits["?"] = "mismatch recorded before restart"
        return entry

    async def run_ticks(self) -> None:
        while True:
            self.tick(time.monotonic())
            await asyncio.sleep(self.settings.tick_interval_s)

    def tick(self, now: float) -> None:
        for worker_id, reason in self.members.expire(now):
            if self.members.workers[worker_id].state == WorkerState.LEFT:
                log.info("worker left worker=%s", worker_id)
                self.counters.leaves += 1
                self._record_worker(worker_id, "leave", reason)
            else:
                log.warning("lease expired worker=%s reason=%s", worker_id, reason)
                self.counters.crashes += 1
                self._record_worker(worker_id, "crash", reason)
            self.forget_process(worker_id)
        before = self.rounds.phase
        decision = self.rounds.tick(now, self._active_ids() - set(self._sat_out))
        if self.rounds.phase == Phase.TRAINING and before != Phase.TRAINING:
            self._round_started = now
        if decision.reason != self._last_reason:  # tick runs often; log only what changed
            log.info("round=%d phase=%s %s", self.rounds.round, self.rounds.phase, decision.reason)
            self._last_reason = decision.reason
        if decision.form_group:
            group = self._make_group(self._screen_group(decision.members))
            self._future(self._group_ready, self.rounds.round).set_result(group)
            asyncio.get_running_loop().create_task(self._average(self.rounds.round, group))
        elif self._everyone_sat_out():
            # Every worker the round could wait for was refused. They wait for θ_{r+1}, which would never
            # come: close the round with no update instead.
            log.warning(
                "round=%d every worker was refused (%s); closing it with no update",
                self.rounds.round,
                "; ".join(sorted(set(self._sat_out.values()))),
            )
            self.rounds.phase, self.rounds.group = Phase.AVERAGING, ()
            asyncio.get_running_loop().create_task(self._average(self.rounds.round, None))

    def _everyone_sat_out(self) -> bool:
        rounds = self.rounds
        if rounds.phase != Phase.TRAINING or not self._sat_out or rounds.reports:
            return False
        return not self._active_ids() - set(self._sat_out)

    def _record_worker(self, worker_id: str, event: str, detail: str = "") -> None:
        if self.store is not None:
            self.store.save_worker(self.members.workers[worker_id])
        self.telemetry.event(event, worker_id, self.rounds.round, detail)

    def _active_ids(self) -> set[str]:
        """Workers a round waits for: active and not on their way out."""
        return {r.worker_id for r in self.members.active() if not r.leaving}

    def forget_process(self, worker_id: str) -> None:
        """The process behind `worker_id` is gone (its lease ran out, it left, it was evicted, or a new
        process took over its identity): nothing it did in the open round may be mistaken for the work
        of whoever comes next under that id.

        While the round trains, its report is dropped (the group forms without it) and its shards go
        back to the pool. Once the group is formed its pseudo-gradient is in the average, so its
        shards of that round stay with it and count as trained when the round closes: released, they
        would be trained a second time in the same epoch."""
        rounds = self.rounds
        in_group = rounds.phase == Phase.AVERAGING and worker_id in rounds.group
        if rounds.phase == Phase.TRAINING:
            rounds.reports.pop(worker_id, None)
        self._sat_out.pop(worker_id, None)
        self._declared_norms.pop(worker_id, None)
        self._first_lease_at.pop(worker_id, None)  # token claims of a new process start afresh
        self._last_lease_at.pop(worker_id, None)
        released = self.ledger.release(worker_id)
        kept = [lease for lease in released if in_group and lease.round == rounds.round]
        if kept:
            self.ledger.leases[worker_id] = kept
        self._persist_leases()

    @staticmethod
    def _future(table: dict[int, asyncio.Future[Any]], round_: int) -> asyncio.Future[Any]:
        if round_ not in table:
            table[round_] = asyncio.get_running_loop().create_future()
            for old in [r for r in table if r < round_ - 4]:  # long-polls never look this far back
                del table[old]
        return table[round_]

    async def in_replica(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- rounds --------------------------------------------------------------------------------

    def _make_group(self, worker_ids: tuple[str, ...]) -> AveragingGroup:
        group = make_group(
            f"{self.spec.run_id}.r{self.rounds.round}.{uuid.uuid4().hex[:8]}",
            self.backend.peer,
            [(w, self.members.workers[w].peer) for w in worker_ids],
            {w: self.rounds.reports[w].tokens for w in worker_ids},
            self.spec.codec,
            self.spec.allreduce_timeout_s,
        )
        checked = group.members[0].reduce_fraction > 0 and should_check(
            self.spec.seed, self.rounds.round, self.spec.verify_fraction
        )
        if checked:  # a spot-checked round: the coordinator's reducer gets every worker's whole Δ
            members = (
                group.members[0],
                *(dataclasses.replace(m, reduce_fraction=0.0) for m in group.members[1:]),
            )
            group = dataclasses.replace(group, members=members)
        by_peer = {m.peer_id: self._declared_norms.get(m.worker_id, 0.0) for m in group.members[1:]}
        self._group_trust[group.group_id] = (by_peer, checked)
        return group

    async def _average(self, round_: int, group: AveragingGroup | None) -> None:
        """Close round `round_`: all-reduce with `group` and apply the outer step (None: no update)."""
        started = time.monotonic()
        # Only the group's reports count: a worker that reported and then left, or was left out,
        # contributed nothing to this round's average.
        reports = {w: r for w, r in self.rounds.reports.items() if w in self.rounds.group}
        entry = RoundLog(round=round_, workers=len(reports), tokens=sum(r.tokens for r in reports.values()))
        losses = [r.train_loss for r in reports.values() if math.isfinite(r.train_loss)]
        entry.train_loss = sum(losses) / len(losses) if losses else math.nan
        zeros = torch.zeros(self.replica.num_parameters)
        checked = group is not None and self._group_trust.get(group.group_id, ({}, False))[1]
        theta_r = await self.in_replica(self.replica.state.params.clone) if checked else None
        # Spot checks need each worker's first assigned shard, read before the ledger completes the round.
        first_shards = {w: held[0].shard for w in reports if (held := self.ledger.held(w, round_))}
        taken = {lease.shard for lease in self.ledger.all_leases() if lease.round == round_}
        if group is None:
            result, session = AllReduceResult(average=zeros), None
            entry.checksum = await self.in_replica(self.replica.skip)
        else:
            try:
                result = await self.in_replica(self.backend.all_reduce, group, zeros, 0.0)
            except Exception:  # the round must close whatever the data plane did; workers resync
                log.exception("round=%d all-reduce failed on the coordinator; no update this round", round_)
                result = AllReduceResult(average=zeros, failed_spans=len(group.members))
            session = self._record_data_plane_exclusions(round_, group)
            try:
                entry.checksum = await self.in_replica(self.replica.apply, result.average)
            except ValueError as e:  # a non-finite average never reaches the model
                log.error("round=%d average rejected: %s; parameters left unchanged", round_, e)
                # The round still advances (θ_{r+1} = θ_r), or every GetState for r+1 would wait for ever.
                entry.checksum = await self.in_replica(self.replica.skip)
        entry.failed_spans = result.failed_spans
        entry.data_plane_bytes += result.bytes_sent  # each byte counted once, by its sender
        entry.seconds = time.monotonic() - self._round_started
        for worker_id in reports:
            self.members.workers[worker_id].rounds_contributed += 1
        trained = self.ledger.complete_round(round_, set(reports))
        self.history.append(entry)
        left = self.members.apply_leaves()
        self.counters.leaves += len(left)
        if self.store is not None:
            try:
                with self.store.transaction():
                    self.store.save_round(entry)
                    self.store.save_trained(trained)
                    self.store.save_leases(self.ledger)
                    for worker_id in reports:
                        self.store.save_worker(self.members.workers[worker_id])
                    for worker_id in left:
                        self._record_worker(worker_id, "leave")
                    self.store.set_meta("state_bytes", str(self.state_bytes))
                    self.store.set_meta("control_plane_bytes", str(self.control_plane_bytes))
                    self.telemetry.flush()
            except (sqlite3.Error, OSError) as e:
                # E.g. a full disk. The round must still close, or every worker waits on it for ever;
                # a restart resumes from the last round that was written.
                log.error("round=%d not written to the run store: %s; training goes on", round_, e)
                self.telemetry.event("store_failed", round_=round_, detail=str(e), persist=False)
        await self._checkpoint()
        self.telemetry.round_closed(entry, reports, result, time.monotonic() - started)
        now = time.monotonic()
        reason = self.rounds.close(now, self._active_ids())
        self._sat_out.clear()
        self._declared_norms.clear()
        self._round_started = now
        log.info("round=%d closed tokens=%d checksum=%s %s", round_, entry.tokens, entry.checksum, reason)
        self._future(self._round_closed, round_).set_result(entry.checksum)
        async with self._state_changed:
            self._state_changed.notify_all()
        entry.eval_loss = await self.in_replica(self.replica.evaluate)
        log.info("round=%d eval_loss=%.4f", round_, entry.eval_loss)
        self._persist_round_update(entry)
        if theta_r is not None and group is not None:
            await self._run_spot_checks(round_, theta_r, session, group, first_shards, taken)

    def _persist_round_update(self, entry: RoundLog) -> None:
        if self.store is not None:
            self.store.update_round(
                entry.round,
                eval_loss=entry.eval_loss,
                data_plane_bytes=entry.data_plane_bytes,
                consistent=entry.consistent,
            )

    async def _checkpoint(self) -> None:
        if self.checkpoints is None:
            return
        round_, data, _, checksum = await self.in_replica(self.replica.encoded)
        try:
            info = await self.in_replica(self.checkpoints.save, round_, data, checksum)
            self.telemetry.checkpointed(info.created_at)
        except CheckpointWriteError as e:  # e.g. a full disk: keep training, the older checkpoint stays
            log.error("checkpoint of round %d not written: %s", round_, e)
            self.telemetry.event("checkpoint_failed", round_=round_, detail=str(e))

    # ---- trust: pseudo-gradient hygiene, token claims, spot checks (issue 6) -----------------

    def _init_trust(self) -> None:
        spec = self.spec
        self.norms = NormTracker(spec.norm_outlier_k)
        self.spot_checker = SpotChecker(spec.verify_fail_limit)
        self._declared_norms: dict[str, float] = {}  # the open round's declared ‖Δ‖ per worker
        self._sat_out: dict[str, str] = {}  # workers refused or left out of the open round, and why
        self._first_lease_at: dict[str, tuple[int, float]] = {}  # worker -> (round, its first lease)
        # Group id -> (declared norms by peer id, keep every contribution for spot checks), read by the
        # backend's session hook in the data-plane thread; and the sessions it saw, by group id.
        self._group_trust: dict[str, tuple[dict[str, float], bool]] = {}
        self._sessions: dict[str, ReduceSession] = {}
        self._spot_data: tuple[Any, Any, Any] | None = None  # (train tokens, scratch model, layout)
        policy = AggregationPolicy(
            spec.aggregation, spec.norm_outlier_k, spec.clip_iterations, spec.trim_fraction
        )
        if hasattr(self.backend, "session_hook"):  # the hivemind backend; test doubles may have none
            self.backend.policy = policy  # type: ignore[attr-defined]
            self.backend.session_hook = self._on_session  # type: ignore[attr-defined]

    def _on_session(self, session: ReduceSession) -> None:
        """The coordinator's reducer opened a session (data-plane thread, before it serves anyone)."""
        declared, keep = self._group_trust.get(session.group.group_id, ({}, False))
        session.declared_norms = dict(declared)
        if keep:
            session.keep_contributions()
        self._sessions[session.group.group_id] = session

    def _sit_out(self, worker_id: str, reason: str) -> None:
        """`worker_id` takes no part in the open round: the round stops waiting for its report."""
        self._sat_out[worker_id] = reason
        self.rounds.reports.pop(worker_id, None)

    def screen_report(
        self, worker_id: str, round_: int, tokens: int, compute_s: float, norm: float
    ) -> tuple[str, str]:
        """Why a report must be refused ("" if it may go on) and the refusal's metric label. A refused
        worker sits the round out (the round does not wait for it) and resyncs."""
        if not (math.isfinite(norm) and norm >= 0):
            reason = f"pseudo_gradient_norm must be finite and >= 0, got {norm}"
            if round_ == self.rounds.round and self.rounds.phase == Phase.TRAINING:
                self._sit_out(worker_id, reason)
            return reason, "invalid_argument"
        if round_ != self.rounds.round or self.rounds.phase != Phase.TRAINING:
            return "", ""  # a late report: `report` answers it
        shard_tokens = self.spec.steps_per_shard * self.spec.tokens_per_step
        first = self._first_lease_at.get(worker_id)
        seconds = self.shard_seconds.get(worker_id)
        claim = Claim(
            tokens=tokens,
            compute_seconds=compute_s,
            leased_tokens=len(self.ledger.held(worker_id, round_)) * shard_tokens,
            wall_seconds=time.monotonic() - first[1] if first is not None and first[0] == round_ else None,
            measured_rate=shard_tokens / seconds if seconds else None,
        )
        refusal = claim_refusal(claim, self.spec.claim_rate_slack)
        if refusal:
            log.warning("impossible claim worker=%s round=%d: %s", worker_id, round_, refusal)
            self._sit_out(worker_id, f"impossible token claim: {refusal}")
            return f"impossible token claim for round {round_}: {refusal}", "impossible_claim"
        self._declared_norms[worker_id] = norm
        self.norms.record(worker_id, norm)
        return "", ""

    def _screen_group(self, members: tuple[str, ...]) -> tuple[str, ...]:
        """Leave out workers whose declared norm is an outlier (never all of them)."""
        excluded = self.norms.screen({w: self._declared_norms.get(w, 0.0) for w in members})
        if not excluded or len(excluded) >= len(members):
            return members
        for worker_id, why in excluded.items():
            log.warning("round=%d left out worker=%s: %s", self.rounds.round, worker_id, why)
            self._sit_out(worker_id, why)
            self.telemetry.excluded("norm_outlier", worker_id, self.rounds.round, why)
        kept = tuple(w for w in members if w not in excluded)
        self.rounds.group = kept
        return kept

    def _record_data_plane_exclusions(self, round_: int, group: AveragingGroup) -> ReduceSession | None:
        """What the coordinator's own reducer left out of its span, as events and metrics."""
        session = self._sessions.pop(group.group_id, None)
        for gid in [g for g in self._group_trust if g != group.group_id]:
            self._group_trust.pop(gid, None)
        self._group_trust.pop(group.group_id, None)
        if session is None:
            return None
        workers = {m.peer_id: m.worker_id for m in group.members}
        for peer, why in session.banned.items():
            if why.startswith("sent nothing"):
                continue  # silence is a crash, counted as such by the lease
            label = "norm_outlier" if peer in session.outliers else "data_plane"
            if "declared" in session.outliers.get(peer, ""):
                label = "norm_mismatch"
            self.telemetry.excluded(label, workers.get(peer, peer), round_, why)
        return session

    def _spot_check_batches(self, shard: int, count: int) -> list[torch.Tensor]:
        tokens, _, _ = self._spot_data_loaded()
        reader = shard_reader(self.spec, tokens, self.ledger.num_shards)
        reader.start(shard)
        return [reader.next_batch() for _ in range(count)]

    def _spot_data_loaded(self) -> tuple[Any, Any, Any]:
        if self._spot_data is None:
            data = load_run_data(self.spec)  # the workers' own tokens: same spec, same function
            model = build_run_model(self.spec, data.vocab_size)
            self._spot_data = (data.corpus.train, model, ParamLayout.of(model))
        return self._spot_data

    def _spot_check(
        self,
        round_: int,
        theta: torch.Tensor,
        deltas: dict[str, torch.Tensor],
        assigned: dict[str, int],
        taken: set[int],
    ) -> list[tuple[str, bool, str]]:
        """Judge each worker's Δ on its first assigned shard against control shards (replica thread)."""
        _, model, layout = self._spot_data_loaded()
        n = self.spec.verify_batches
        free = [s for s in range(self.ledger.num_shards) if s not in taken]
        rng = random.Random(f"{self.spec.seed}:{round_}")
        control_shards = rng.sample(free, min(len(free), n)) or [0]
        control = [b for s in control_shards for b in self._spot_check_batches(s, 1)][:n]
        verdicts = []
        for worker_id, delta in sorted(deltas.items()):
            batches = self._spot_check_batches(assigned[worker_id], n)
            passed, reason = judge(measure(model, layout, theta, delta, batches, control))
            verdicts.append((worker_id, passed, reason))
        return verdicts

    async def _run_spot_checks(
        self,
        round_: int,
        theta: torch.Tensor,
        session: ReduceSession | None,
        group: AveragingGroup,
        assigned: dict[str, int],
        taken: set[int],
    ) -> None:
        if session is None or session.contributions is None or session.span.length != theta.numel():
            log.warning(
                "round=%d spot check skipped: the coordinator did not reduce the whole vector", round_
            )
            return
        workers = {m.peer_id: m.worker_id for m in group.members}
        deltas = {
            workers[p]: v
            for p, v in session.contributions.items()
            if p not in session.banned and workers.get(p) in assigned
        }
        try:
            verdicts = await self.in_replica(self._spot_check, round_, theta, deltas, assigned, taken)
        except Exception:  # a check that cannot run must not stop the run
            log.exception("round=%d spot check failed to run", round_)
            return
        for worker_id, passed, reason in verdicts:
            log.info("round=%d spot check worker=%s passed=%s %s", round_, worker_id, passed, reason)
            self.telemetry.spot_check(worker_id, round_, passed, reason)
            flag = self.spot_checker.record(worker_id, passed, reason)
            if flag:
                self.telemetry.excluded("spot_check", worker_id, round_, flag)
                self.operator.evict(worker_id, f"spot checks: {flag}")

    # ---- what the RPCs ask -------------------------------------------------------------------

    def join(self, **kwargs: Any) -> tuple[WorkerRecord, str]:
        worker_id = kwargs.get("worker_id", "")
        if self.members.replaces_live_process(worker_id, kwargs["peer"]):
            # Restarted before the old process's lease ran out: that lease will never expire to say the
            # old process is gone, so say it here. It had asked to leave (a clean stop), or it crashed.
            old = self.members.workers[worker_id]
            detail = f"a new process took over within the lease (old peer {old.peer.peer_id})"
            if old.leaving:
                self.counters.leaves += 1
                self._record_worker(worker_id, "leave", detail)
            else:
                log.warning("worker=%s crashed: %s", worker_id, detail)
                self.counters.crashes += 1
                self._record_worker(worker_id, "crash", detail)
            self.forget_process(worker_id)
        record, reason = self.members.join(now=time.monotonic(), **kwargs)
        log.info("join %s", reason)
        self.counters.joins += 1
        self._record_worker(record.worker_id, "join", reason)
        return record, reason

    def leave(self, worker_id: str) -> str:
        reason = self.members.request_leave(worker_id)
        self.forget_process(worker_id)
        return reason

    def _persist_leases(self) -> None:
        if self.store is not None:
            self.store.save_leases(self.ledger)

    def lease_data(self, worker_id: str, round_: int, index: int = 0) -> LeaseOutcome:
        """The `index`-th shard `worker_id` trains in `round_`, or why it should report now instead."""
        now = time.monotonic()
        self.members.touch(worker_id, now)
        steps = self.spec.steps_per_shard
        held = self.ledger.held(worker_id, round_)
        if index < len(held):  # a retried call gets the same answer
            last = self._is_last(round_)
            return LeaseOutcome(held[index], steps, f"shard #{index} of round {round_} already leased", last)
        if index > len(held):
            return LeaseOutcome(None, 0, f"asked for shard #{index} of round {round_} but holds {len(held)}")
        not_open = self._not_open_yet(round_)
        if not_open:
            return LeaseOutcome(None, 0, not_open, wait=True)
        full = self._round_full(worker_id, round_, index, now)
        if full:
            return LeaseOutcome(None, 0, full)
        previous = self._last_lease_at.get(worker_id)
        if index > 0 and previous is not None and previous[0] == round_:
            measured = now - previous[1]
            old = self.shard_seconds.get(worker_id)
            self.shard_seconds[worker_id] = measured if old is None else 0.5 * old + 0.5 * measured
        self._last_lease_at[worker_id] = (round_, now)
        if index == 0:
            self._first_lease_at[worker_id] = (round_, now)  # token claims are bounded from here
        lease, reason = self.ledger.lease(worker_id, round_, index)
        log.debug("lease %s", reason)
        self._persist_leases()
        return LeaseOutcome(lease, steps, reason, self._is_last(round_))

    def _not_open_yet(self, round_: int) -> str:
        """Why a worker should wait before training `round_` ("" = it may ask for a shard now)."""
        current, phase = self.rounds.round, self.rounds.phase
        if (round_ == current and phase == Phase.PAUSED) or (round_ > current and self.rounds.paused):
            return f"paused by the operator; round {round_} opens on resume"
        if round_ == current and phase == Phase.WAITING:
            return f"round {round_} opens when enough workers are active"
        return ""

    def _is_last(self, round_: int) -> bool:
        if self.spec.round_mode == "fixed_steps":
            return True
        shard_tokens = self.spec.steps_per_shard * self.spec.tokens_per_step
        leased = sum(1 for lease in self.ledger.all_leases() if lease.round == round_)
        return self.round_budget(round_) - leased * shard_tokens < shard_tokens / 2

    def round_budget(self, round_: int) -> int:
        """Tokens round `round_` may train: fixed by the spec, or H steps' worth per worker taking part."""
        if self.spec.round_tokens:
            return self.spec.round_tokens
        taking_part = {lease.worker_id for lease in self.ledger.all_leases() if lease.round == round_}
        taking_part |= self._active_ids()
        return len(taking_part) * self.spec.inner_steps * self.spec.tokens_per_step

    def _round_full(self, worker_id: str, round_: int, index: int, now: float) -> str:
        """Why `worker_id` gets no further shard in `round_` (empty: it gets one)."""
        current, phase = self.rounds.round, self.rounds.phase
        if phase == Phase.FINISHED or (self.spec.max_rounds and round_ >= self.spec.max_rounds):
            return f"the run ends before round {round_}"
        # With overlap a worker reports round r in the background and trains r+1 at once, before the
        # slowest worker has reported r: so r+1 is open from the moment r is. Without it, from r's group.
        ahead = phase == Phase.AVERAGING or (self.spec.overlap and phase == Phase.TRAINING)
        open_rounds = {current, current + 1} if ahead else {current}
        if round_ not in open_rounds:
            return f"round {round_} is not open (round {current} is {phase})"
        if round_ == current and phase == Phase.AVERAGING:
            return f"round {round_} is already averaging"
        reported = set(self.rounds.reports) if round_ == current else set()
        still_training = (self._active_ids() - reported) | {worker_id}
        return next_shard_refusal(
            BudgetView(
                mode=self.spec.round_mode,
                round=round_,
                index=index,
                budget_tokens=self.round_budget(round_),
                leased_shards=sum(1 for lease in self.ledger.all_leases() if lease.round == round_),
                shard_tokens=self.spec.steps_per_shard * self.spec.tokens_per_step,
                my_shard_seconds=self.shard_seconds.get(worker_id),
                others_shard_seconds=[self.shard_seconds.get(w) for w in still_training - {worker_id}],
            )
        )

    def start_round_for_joiner(self) -> int:
        """The round a joiner trains in: the open one, or the next if this one is already averaging."""
        if self.rounds.phase == Phase.AVERAGING:
            return self.rounds.round + 1
        return self.rounds.round

    async def report(self, worker_id: str, round_: int, report: Report, wait_s: float) -> GroupOutcome:
        self.members.touch(worker_id, time.monotonic())
        rounds = self.rounds
        # A retry whose first try formed the group (its answer lost on the way): the same group again,
        # or the worker would stay away from an all-reduce that waits for it.
        repeated = round_ == rounds.round and rounds.phase == Phase.AVERAGING and worker_id in rounds.group
        if not repeated:
            accepted, reason = rounds.report(round_, report)
            if not accepted:
                return GroupOutcome(False, reason, None, self.start_round_for_joiner())
            self.tick(time.monotonic())  # the last report forms the group at once
        try:
            group = await asyncio.wait_for(asyncio.shield(self._future(self._group_ready, round_)), wait_s)
        except TimeoutError:
            return GroupOutcome(False, "no group was formed in time", None, self.rounds.round)
        if worker_id not in {m.worker_id for m in group.members}:
            why = self._sat_out.get(worker_id, "")
            return GroupOutcome(
                False,
                f"left out of round {round_}: {why}" if why else "the group was formed without you",
                None,
                round_ + 1,
            )
        return GroupOutcome(True, "group formed", group, round_ + 1)

    async def commit(
        self, worker_id: str, round_: int, checksum: str, data_bytes: int, wait_s: float
    ) -> CommitOutcome:
        self.members.touch(worker_id, time.monotonic())
        known = round_ in self._round_closed or (
            self.rounds.round == round_ and self.rounds.phase == Phase.AVERAGING
        )
        if not known:
            # Not a round this coordinator averaged (e.g. it restarted mid-round): start over from its state.
            self.counters.resyncs += 1
            self.telemetry.event("resync", worker_id, round_, f"round {round_} is unknown here")
            return CommitOutcome(True, False, f"round {round_} is unknown here", self.replica.state.round, "")
        expected = await asyncio.wait_for(asyncio.shield(self._future(self._round_closed, round_)), wait_s)
        entry = next((h for h in reversed(self.history) if h.round == round_), None)
        # A retried commit (its answer lost) gets the same answer but is not counted twice.
        first = entry is None or worker_id not in entry.commits
        if entry is not None:
            if first:
                entry.data_plane_bytes += data_bytes
            entry.commits[worker_id] = checksum
            self._persist_round_update(entry)
        stop = self.rounds.phase == Phase.FINISHED
        if checksum != expected:
            log.warning(
                "checksum mismatch worker=%s round=%d got=%s want=%s", worker_id, round_, checksum, expected
            )
            if first:
                self.counters.resyncs += 1
                self.telemetry.event("resync", worker_id, round_, "checksum differs")
            return CommitOutcome(
                True, stop, "checksum differs from the coordinator's replica", round_ + 1, expected
            )
        return CommitOutcome(False, stop, "run finished" if stop else "ok", round_ + 1, expected)

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
        if self.store is not None:
            self.store.close()
