"""What the coordinator records when a worker's process goes away at an awkward moment: a restart
inside the lease, a leave after reporting, a leave or restart while its round averages, a retried
ReportRound or CommitRound whose first answer was lost, and a run store that cannot be written.

The core runs for real (rounds, membership, ledger, telemetry, its asyncio futures); the replica and
the data plane are small stand-ins, since no tensor work matters here."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from antorcha.averaging.base import AllReduceResult, AveragingGroup, PeerDescriptor
from antorcha.config import CoordinatorSettings, RunSpec
from antorcha.coordinator.core import CoordinatorCore
from antorcha.coordinator.rounds import Phase, Report
from antorcha.coordinator.store import RunStore
from antorcha.protocol import DeviceInfo


class _Replica:
    num_parameters = 4

    def __init__(self, shards: int) -> None:
        self.num_data_shards = shards
        self.state = SimpleNamespace(params=torch.zeros(4), round=0)
        self.checksum = "c0"

    def apply(self, average: torch.Tensor) -> str:
        if not bool(torch.isfinite(average).all()):
            raise ValueError("averaged pseudo-gradient is not finite")  # as the real replica does
        self.state.params = self.state.params - average
        return self.skip()

    def skip(self) -> str:
        self.state.round += 1
        self.checksum = f"c{self.state.round}"
        return self.checksum

    def evaluate(self) -> float:
        return 1.0


class _DataPlane:
    """Records each group; `gate` holds the all-reduce open (the round stays AVERAGING) until set."""

    peer = PeerDescriptor("coordinator-peer", ("/ip4/127.0.0.1/tcp/1",), False)

    def __init__(self) -> None:
        self.groups: list[AveragingGroup] = []
        self.gate = threading.Event()
        self.gate.set()
        self.average: torch.Tensor | None = None  # what the all-reduce yields; None: zeros

    def all_reduce(self, group: AveragingGroup, zeros: torch.Tensor, weight: float) -> AllReduceResult:
        self.groups.append(group)
        self.gate.wait(10)
        return AllReduceResult(average=zeros if self.average is None else self.average)


def _core(
    store: RunStore | None = None, shards: int = 64, **spec: object
) -> tuple[CoordinatorCore, _DataPlane]:
    plane = _DataPlane()
    run = RunSpec(run_id="churn", min_workers=2, max_rounds=0, **spec)  # type: ignore[arg-type]
    return CoordinatorCore(run, CoordinatorSettings(), _Replica(shards), plane, store), plane  # type: ignore[arg-type]


def _join(core: CoordinatorCore, worker_id: str, peer: str) -> None:
    core.join(name=worker_id, peer=PeerDescriptor(peer, (), True), device=DeviceInfo(), worker_id=worker_id)


def _report(worker_id: str, tokens: int = 100) -> Report:
    return Report(worker_id, tokens, 1, 1.0, 0.1)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


def _start(core: CoordinatorCore, *workers: tuple[str, str]) -> dict[str, int]:
    for worker_id, peer in workers:
        _join(core, worker_id, peer)
    core.tick(time.monotonic())
    shards = {}
    for worker_id, _ in workers:
        lease = core.lease_data(worker_id, 0, 0).lease
        assert lease is not None
        shards[worker_id] = lease.shard
    return shards


def _members(group: AveragingGroup) -> list[tuple[str, str, float]]:
    return [(m.worker_id, m.peer_id, m.weight) for m in group.members[1:]]  # [0] is the coordinator


def test_a_report_of_a_dead_process_is_not_used_once_a_new_one_takes_its_identity() -> None:
    async def scenario() -> None:
        core, plane = _core()
        _start(core, ("a", "peer-a1"), ("b", "peer-b"))
        old = asyncio.create_task(core.report("a", 0, _report("a", 999), 60))
        await _settle()
        _join(core, "a", "peer-a2")  # kill -9 and a restart inside the lease
        assert "a" not in core.rounds.reports and core.counters.crashes == 1
        assert core.ledger.held("a", 0) == [], "the dead process's shard went back to the pool"
        waiting = asyncio.create_task(core.report("b", 0, _report("b"), 60))
        await _settle()
        assert plane.groups == [] and core.rounds.phase == Phase.TRAINING, "the round waits for the new a"
        assert core.lease_data("a", 0, 0).lease is not None
        fresh = asyncio.create_task(core.report("a", 0, _report("a", 100), 60))
        await _settle()
        assert _members(plane.groups[-1]) == [("a", "peer-a2", 100.0), ("b", "peer-b", 100.0)]
        await asyncio.gather(old, waiting, fresh)

    asyncio.run(scenario())


def test_only_the_group_counts_in_the_round_log_not_a_worker_that_reported_then_left() -> None:
    async def scenario() -> None:
        core, plane = _core()
        _start(core, ("a", "peer-a"), ("b", "peer-b"))
        left = asyncio.create_task(core.report("a", 0, _report("a", 5000), 60))
        await _settle()
        core.leave("a")  # SIGTERM after reporting: the round no longer waits for it
        stayed = asyncio.create_task(core.report("b", 0, _report("b", 100), 60))
        await _settle()
        assert [m[0] for m in _members(plane.groups[-1])] == ["b"]
        entry = core.history[-1]
        assert (entry.workers, entry.tokens) == (1, 100)
        assert core.members.workers["a"].rounds_contributed == 0
        assert not (await left).accepted and (await stayed).accepted

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["evict", "leave", "restart"])
def test_a_group_member_gone_while_its_round_averages_keeps_its_shard_trained_once(how: str) -> None:
    async def scenario() -> None:
        # Two shards, two workers: round 0 covers the epoch, so a shard released by mistake would be
        # handed out again in the same epoch and trained twice.
        core, plane = _core(shards=2, overlap=True)
        shards = _start(core, ("a", "peer-a"), ("b", "peer-b"))
        plane.gate.clear()
        reports = [asyncio.create_task(core.report(w, 0, _report(w), 60)) for w in ("a", "b")]
        await _settle()
        assert core.rounds.phase == Phase.AVERAGING and core.rounds.group == ("a", "b")
        if how == "evict":
            core.operator.evict("a", "test")
        elif how == "leave":
            core.leave("a")
        else:
            _join(core, "a", "peer-a2")
        assert core.ledger.held("a", 0) != [], "a's Δ is in this round's average"
        ahead = core.lease_data("b", 1, 0).lease  # overlap: round 1 leases while round 0 averages
        assert ahead is not None and ahead.epoch == 1, "nothing of epoch 0 is left to train"
        plane.gate.set()
        await asyncio.gather(*reports)
        await _settle()
        epoch0 = sorted((t.shard, t.worker_id) for t in core.ledger.history if t.epoch == 0)
        assert epoch0 == sorted([(shards["a"], "a"), (shards["b"], "b")])

    asyncio.run(scenario())


def test_a_clean_leave_then_a_quick_restart_is_a_leave_not_a_crash() -> None:
    core, _ = _core()
    _start(core, ("a", "peer-a"), ("b", "peer-b"))
    core.leave("a")
    _join(core, "a", "peer-a2")
    assert (core.counters.leaves, core.counters.crashes) == (1, 0)
    assert not core.members.workers["a"].leaving, "the new process takes part"


def test_a_retried_report_of_a_group_member_gets_its_group_and_a_retried_commit_counts_once() -> None:
    async def scenario() -> None:
        core, plane = _core()
        _start(core, ("a", "peer-a"), ("b", "peer-b"))
        plane.gate.clear()
        first = [asyncio.create_task(core.report(w, 0, _report(w), 60)) for w in ("a", "b")]
        await _settle()
        assert all(t.result().accepted for t in first)
        # The first answer to a was lost on the wire; the client sends the same ReportRound again.
        again = await core.report("a", 0, _report("a"), 60)
        assert again.accepted and again.group is first[0].result().group
        plane.gate.set()
        await _settle()
        checksum = core.history[-1].checksum
        answers = [await core.commit("a", 0, checksum, 1000, 5) for _ in range(2)]
        assert core.history[-1].data_plane_bytes == 1000
        assert all(not a.resync for a in answers)
        wrong = [await core.commit("b", 0, "not-it", 1000, 5) for _ in range(2)]
        assert all(w.resync for w in wrong) and core.counters.resyncs == 1
        assert core.history[-1].data_plane_bytes == 2000

    asyncio.run(scenario())


def test_a_resync_for_an_unknown_round_survives_a_restart_of_the_count(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = RunStore(tmp_path / "run.sqlite")
        store.bind_run("{}", "x")
        core, _ = _core(store)
        _join(core, "a", "peer-a")
        answer = await core.commit("a", 7, "abc", 0, 1.0)  # a round this coordinator never averaged
        assert answer.resync and core.counters.resyncs == 1
        assert store.event_counts().get("resync") == 1, "the count is rebuilt from events at a restart"
        store.close()

    asyncio.run(scenario())


def test_a_run_store_that_cannot_be_written_does_not_hold_the_round(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = RunStore(tmp_path / "run.sqlite")
        store.bind_run("{}", "x")
        core, _ = _core(store)
        _start(core, ("a", "peer-a"), ("b", "peer-b"))

        def full_disk(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        store.save_round = full_disk  # type: ignore[method-assign]
        answers = await asyncio.gather(*(core.report(w, 0, _report(w), 60) for w in ("a", "b")))
        assert all(a.accepted for a in answers)
        commit = await asyncio.wait_for(core.commit("a", 0, "c1", 0, 5), 5)
        assert not commit.resync, "the round closed and answered its commits"
        assert core.rounds.round == 1 and core.rounds.phase == Phase.TRAINING
        assert [e.kind for e in core.telemetry.recent_events(50)].count("store_failed") == 1
        store.close()

    asyncio.run(scenario())


def test_commits_of_the_last_checkpointed_round_are_answered_after_a_restart(tmp_path: Path) -> None:
    """Killed after round 0's checkpoint but before its commits were answered: once restarted, a
    commit of round 0 with the right checksum is answered `ok`, not sent to download the same state."""
    from antorcha.coordinator.checkpoints import CheckpointStore
    from antorcha.coordinator.replica import CoordinatorReplica

    spec = RunSpec(run_id="restart", model_size="nano", min_workers=2, max_rounds=0, eval_batches=1)

    def coordinator() -> CoordinatorCore:
        store = RunStore(tmp_path / "run.sqlite")
        checkpoints = CheckpointStore(tmp_path / "checkpoints", 3)
        replica, plane = CoordinatorReplica(spec), _DataPlane()
        return CoordinatorCore(spec, CoordinatorSettings(), replica, plane, store, checkpoints)  # type: ignore[arg-type]

    async def first_life() -> str:
        core = coordinator()
        await core.start()
        _start(core, ("a", "peer-a"), ("b", "peer-b"))
        await asyncio.gather(*(core.report(w, 0, _report(w), 60) for w in ("a", "b")))
        await _settle()
        assert core.rounds.round == 1
        core.close()
        return core.history[-1].checksum

    async def second_life(checksum: str) -> None:
        core = coordinator()
        await core.start()
        assert core.rounds.round == 1 and core.replica.checksum == checksum
        _join(core, "a", "peer-a")
        answer = await asyncio.wait_for(core.commit("a", 0, checksum, 0, 5), 5)
        assert not answer.resync and answer.next_round == 1
        stale = await core.commit("b", 0, "something-else", 0, 5)
        assert stale.resync, "a wrong checksum still resyncs"
        core.close()

    checksum = asyncio.run(first_life())
    asyncio.run(second_life(checksum))


def test_a_round_in_which_every_worker_was_refused_closes_with_no_update() -> None:
    async def scenario() -> None:
        core, plane = _core()
        _start(core, ("a", "peer-a"), ("b", "peer-b"))
        for worker_id in ("a", "b"):  # both declare a non-finite ‖Δ‖: both sit the round out
            reason, label = core.screen_report(worker_id, 0, 100, 1.0, math.nan)
            assert label == "invalid_argument" and "finite" in reason
        core.tick(time.monotonic())
        # The refused workers resync to θ_1: it must come, equal to θ_0.
        await asyncio.wait_for(core.wait_for_state(1, 5), 5)
        await _settle()
        assert plane.groups == [], "nothing was averaged"
        assert core.rounds.round == 1 and core.rounds.phase == Phase.TRAINING
        assert core.replica.state.round == 1 and torch.equal(core.replica.state.params, torch.zeros(4))
        entry = core.history[-1]
        assert (entry.round, entry.workers, entry.tokens) == (0, 0, 0)
        assert core.ledger.all_leases() == [], "round 0's shards went back to the pool"
        assert core.lease_data("a", 1, 0).lease is not None, "and the refused workers train round 1"

    asyncio.run(scenario())


def test_a_rejected_average_still_advances_the_round_so_nobody_waits_for_ever() -> None:
    async def scenario() -> None:
        core, plane = _core()
        _start(core, ("a", "peer-a"), ("b", "peer-b"))
        plane.average = torch.full((4,), math.nan)
        await asyncio.gather(*(core.report(w, 0, _report(w), 60) for w in ("a", "b")))
        await asyncio.wait_for(core.wait_for_state(1, 5), 5)
        assert core.rounds.round == core.replica.state.round == 1
        assert torch.equal(core.replica.state.params, torch.zeros(4)), "the NaN reached nothing"

    asyncio.run(scenario())
