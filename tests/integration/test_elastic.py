"""Elastic membership with real processes: joins mid-run, crashes at planned moments, restarts with the
same identity, a coordinator killed with -9 and restarted, and the data ledger under churn."""

from __future__ import annotations

import json
import math
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from antorcha.experiments.cluster import LocalCluster
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

BASE_RUN = {
    "model_size": "nano",
    "seq_len": 64,
    "batch_size": 8,
    "inner_steps": 10,
    "inner_lr": 3e-3,
    "inner_warmup_steps": 5,
    "round_deadline_s": 120.0,
    "allreduce_timeout_s": 5.0,
    "eval_batches": 4,
    "corpus_max_bytes": 200_000,
}


def _finished(s: pb.RunStatus) -> bool:
    return s.phase == "finished" and all(math.isfinite(r.eval_loss) for r in s.rounds)


def _log(cluster: LocalCluster, name: str) -> str:
    return (cluster.workdir / f"{name}.log").read_text(errors="replace")


def test_a_joiner_contributes_in_the_round_it_joins_after_a_cut_download(tmp_path: Path) -> None:
    # Many rounds, so the run cannot end before the joiner is in; the test stops once it has contributed.
    run = {**BASE_RUN, "run_id": "join", "max_rounds": 60, "min_workers": 2}
    # Small state chunks so that cutting the download "halfway" means something.
    with LocalCluster(tmp_path, run=run, coordinator={"lease_s": 6.0, "state_chunk_bytes": 65536}) as cluster:
        cluster.start_coordinator()
        cluster.start_worker("a")
        cluster.start_worker("b")
        cluster.wait_for(lambda s: s.round >= 2, 180)
        cut = json.dumps(
            [{"round": r, "phase": "download", "action": "cut", "bytes": 300_000} for r in range(60)]
        )
        cluster.start_worker("c", {"fault_plan": cut})

        def c_contributed(s: pb.RunStatus) -> bool:
            c = [w for w in s.workers if w.name == "c"]
            return (
                bool(c) and c[0].rounds_contributed >= 1 and all(math.isfinite(r.eval_loss) for r in s.rounds)
            )

        status = cluster.wait_for(c_contributed, 240)
        log_c = _log(cluster, "c")
    joined = int(re.search(r"joined worker=\S+ run=\S+ round=(\d+)", log_c).group(1))  # type: ignore[union-attr]
    assert joined >= 2
    record = status.rounds[joined]
    assert record.workers == 3, "the joiner is in the group of the round it joined in"
    assert record.replicas_consistent
    assert f"round={joined} done" in log_c and f"checksum={record.checksum[:12]}" in log_c
    # The cut download resumed from where it broke and still verified.
    assert "connection cut after" in log_c
    assert "state synced" in log_c
    assert status.replicas_consistent
    assert status.joins == 3


def test_kill_9_at_every_phase_restart_with_same_identity_and_ledger_exactly_once(tmp_path: Path) -> None:
    run = {**BASE_RUN, "run_id": "chaos", "max_rounds": 24, "min_workers": 2}
    lease_s, timeout_s = 4.0, run["allreduce_timeout_s"]
    # One kill -9 per incarnation of the victim, each at another moment of a round it takes part in.
    phases = [
        {"phase": "train", "step": 3},
        {"phase": "report"},
        {"phase": "allreduce"},
        {"phase": "commit"},
        {"phase": "train", "step": 9},
    ]

    def plan(round_: int, deaths: int) -> dict[str, str]:
        # Every round from the next one on: the first round it trains in is where it dies.
        faults = [{"round": r, "action": "kill", **phases[deaths]} for r in range(round_, round_ + 20)]
        return {"fault_plan": json.dumps(faults)}

    with LocalCluster(
        tmp_path,
        run=run,
        coordinator={"lease_s": lease_s, "heartbeat_interval_s": 1.0, "data_dir": str(tmp_path / "data")},
    ) as cluster:
        cluster.start_coordinator()
        cluster.start_worker("a")
        cluster.start_worker("b")
        victim = cluster.start_worker("victim", plan(1, 0))
        deaths = 0
        deadline = time.monotonic() + 420
        while not _finished(status := cluster.status()):
            assert time.monotonic() < deadline, f"stalled at round {status.round} ({status.phase})"
            if victim.poll() is not None:
                assert victim.returncode == -signal.SIGKILL
                deaths += 1
                # Same identity file: the coordinator must take it back under the same worker id.
                extra = plan(status.round + 1, deaths) if deaths < len(phases) else None
                victim = cluster.start_worker("victim", extra)
            time.sleep(0.3)
        cluster.wait_workers(60)
        status = cluster.status()

    assert deaths == len(phases)
    assert [r.round for r in status.rounds] == list(range(24)), "no round lost or counted twice"
    assert all(math.isfinite(r.eval_loss) and math.isfinite(r.train_loss) for r in status.rounds)
    assert all(r.replicas_consistent for r in status.rounds), "every surviving replica agreed"
    assert status.rounds[-1].eval_loss < status.initial_eval_loss * 0.9
    usual = sorted(r.seconds for r in status.rounds)[len(status.rounds) // 2]
    slowest = max(r.seconds for r in status.rounds)
    assert slowest <= lease_s + 3 * timeout_s + usual + 10, (
        f"slowest round {slowest:.1f}s, usual {usual:.1f}s"
    )
    names = [w.name for w in status.workers]
    assert names.count("victim") == 1, "the restarted worker kept its identity"
    # Each kill is one crash: found by its lease running out, or by a restart faster than the lease.
    assert status.crashes == deaths
    # The data ledger: in epoch 0 every shard was trained exactly once, whoever died holding one.
    db = sqlite3.connect(tmp_path / "data" / "run.sqlite")
    rows = db.execute("SELECT epoch, shard FROM trained_shards").fetchall()
    epoch0 = sorted(shard for epoch, shard in rows if epoch == 0)
    assert status.epoch >= 1, "the run covered a whole epoch"
    assert epoch0 == list(range(status.num_data_shards))


def test_coordinator_kill_9_and_restart_resumes_with_no_gap(tmp_path: Path) -> None:
    run = {**BASE_RUN, "run_id": "restart", "max_rounds": 12, "min_workers": 2}

    def uninterrupted() -> float:
        with LocalCluster(tmp_path / "reference", run=run, coordinator={"lease_s": 6.0}) as ref:
            ref.start_coordinator()
            ref.start_worker("a")
            ref.start_worker("b")
            return ref.wait_for(_finished, 300).rounds[-1].eval_loss

    data = tmp_path / "data"
    with LocalCluster(
        tmp_path / "crash", run=run, coordinator={"lease_s": 6.0, "data_dir": str(data)}
    ) as cluster:
        address = cluster.start_coordinator()
        cluster.start_worker("a")
        cluster.start_worker("b")
        cluster.wait_for(lambda s: s.round >= 3 and s.phase == "training", 180)
        assert cluster.coordinator is not None
        cluster.kill(cluster.coordinator)  # kill -9 the coordinator and what it forked
        cluster.coordinator.wait(10)
        # Corrupt the newest checkpoint: the restart must notice and fall back to the one before.
        newest = sorted((data / "checkpoints").glob("round-*.safetensors"))[-1]
        raw = bytearray(newest.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        newest.write_bytes(bytes(raw))
        cluster.coordinator_settings["port"] = int(address.rsplit(":", 1)[1])  # workers know this address
        cluster.start_coordinator()
        status = cluster.wait_for(_finished, 300)
        coordinator_log = _log(cluster, "coordinator")
        cluster.wait_workers(60)

    assert [r.round for r in status.rounds] == list(range(12)), "no gap and no duplicate in the round log"
    assert status.restarts == 1
    assert "checkpoint rejected" in coordinator_log and "sha256" in coordinator_log
    assert all(r.replicas_consistent for r in status.rounds[3:])
    reference = uninterrupted()
    assert abs(status.rounds[-1].eval_loss - reference) <= 0.05 * reference


def test_a_straggler_is_left_out_and_told_and_a_leaver_does_not_hold_the_round(tmp_path: Path) -> None:
    run = {**BASE_RUN, "run_id": "straggle", "max_rounds": 5, "min_workers": 3, "round_deadline_s": 4.0}
    with LocalCluster(tmp_path, run=run, coordinator={"lease_s": 6.0}) as cluster:
        cluster.start_coordinator()
        cluster.start_worker("fast")
        cluster.start_worker("slow", {"slowdown": 30.0})  # its 10 inner steps take far past the deadline
        leaver = cluster.start_worker("leaver")
        cluster.wait_for(lambda s: s.round >= 2, 180)
        cluster.kill(leaver, signal.SIGTERM)
        assert leaver.wait(30) == 0
        status = cluster.wait_for(_finished, 240)
        log_slow, log_leaver = _log(cluster, "slow"), _log(cluster, "leaver")
        coordinator_log = _log(cluster, "coordinator")
    # Told that its round went on without it (the group formed, or later rounds already opened), and
    # resynced to the open round instead of averaging stale work.
    assert re.search(r"round=\d+ not averaged: .*; resyncing to round \d+", log_slow)
    assert "left out" in coordinator_log
    assert "left the run cleanly" in log_leaver
    assert status.leaves == 1 and status.crashes == 0
    assert all(r.workers <= 2 for r in status.rounds[3:]), "neither the leaver nor the straggler held a round"
    assert all(r.replicas_consistent for r in status.rounds)
    assert max(r.seconds for r in status.rounds) < run["round_deadline_s"] + 10
