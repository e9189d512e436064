"""The run queue on a live fleet: one coordinator, two workers started once; a Python script submits
two runs one after the other with `antorcha.Client`; both finish, the workers were never restarted
(same processes throughout), and each run has its own checkpoints and summary."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from antorcha.api import Client, load_spec
from antorcha.coordinator.runs import RunQueue
from antorcha.experiments.cluster import LocalCluster
from antorcha.worker.client import CoordinatorRefusedError

pytestmark = pytest.mark.slow

BASE = {
    "model_size": "nano",
    "seq_len": 32,
    "batch_size": 2,
    "round_mode": "fixed_steps",
    "inner_steps": 4,
    "min_workers": 2,
    "eval_batches": 1,
    "round_deadline_s": 60.0,
    "allreduce_timeout_s": 10.0,
    "corpus_max_bytes": 300_000,
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from antorcha import Client

    address, first, second = sys.argv[1:4]
    with Client(address) as client:
        out = {}
        for spec in (first, second):
            run = client.submit(spec)
            info = run.wait(timeout_s=300)
            out[info.run_id] = {"state": info.state, "summary": info.summary, "metrics": run.metrics()}
        print(json.dumps(out))
    """
)


def test_two_runs_submitted_from_python_run_on_the_same_workers(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    specs = []
    for name, rounds, seed in (("first", 2, 1), ("second", 3, 2)):
        path = tmp_path / f"{name}.toml"
        fields = {**BASE, "run_id": name, "max_rounds": rounds, "seed": seed}
        path.write_text("[run]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items()) + "\n")
        specs.append(path)
    assert load_spec(specs[0]).max_rounds == 2
    with LocalCluster(
        tmp_path / "cluster",
        run={**BASE, "run_id": "warmup", "max_rounds": 1},
        coordinator={"data_dir": str(data_dir), "wait_for_runs": True, "http_port": 0},
    ) as cluster:
        address = cluster.start_coordinator()
        workers = {name: cluster.start_worker(name) for name in ("volunteer-a", "volunteer-b")}
        pids = {name: proc.pid for name, proc in workers.items()}
        script = subprocess.run(
            [sys.executable, "-c", SCRIPT, address, str(specs[0]), str(specs[1])],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert script.returncode == 0, script.stderr[-3000:]
        results = json.loads(script.stdout.strip().splitlines()[-1])
        # The same worker processes trained every run, and are still waiting for the next one.
        for name, proc in cluster.workers.items():
            assert proc.poll() is None, cluster.tail(name)
            assert proc.pid == pids[name]
        with Client(address) as client:
            with pytest.raises(CoordinatorRefusedError, match="already submitted"):
                client.submit(specs[0])
            # An endless run, cancelled from the shell once it trained a round: it ends after the
            # round in flight, and the workers stay for whatever comes next.
            endless = client.submit({**BASE, "run_id": "endless", "max_rounds": 0})
            deadline = time.monotonic() + 180
            while not any(r["round"] >= 0 for r in endless.metrics()):
                assert time.monotonic() < deadline, "the endless run trained no round"
                time.sleep(1)
            cancel = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "antorcha",
                    "run",
                    "cancel",
                    "endless",
                    "--reason",
                    "enough",
                    "--coordinator",
                    address,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cancel.returncode == 0 and "ends after its round" in cancel.stdout, cancel.stderr
            ended = endless.wait(timeout_s=120)
            runs = {r.run_id: r for r in client.runs()}
        assert ended.state == "cancelled" and ended.detail == "enough"
        assert ended.summary["rounds"] >= 1 and ended.summary["replicas_consistent"]
        for name, proc in cluster.workers.items():
            assert proc.poll() is None, cluster.tail(name)
        log_a = (cluster.workdir / "volunteer-a.log").read_text()
    assert [runs[r].state for r in ("warmup", "first", "second")] == ["finished"] * 3
    assert [runs[r].position for r in ("warmup", "first", "second")] == [1, 2, 3]
    assert "joining the next run first" in log_a and "joining the next run second" in log_a
    for run_id, rounds in (("first", 2), ("second", 3)):
        result = results[run_id]
        assert result["state"] == "finished"
        summary = result["summary"]
        assert summary["rounds"] == rounds and summary["replicas_consistent"]
        assert len(summary["workers"]) == 2
        assert summary["final_eval_loss"] < summary["initial_eval_loss"]
        assert [m["round"] for m in result["metrics"]] == list(range(rounds))
        folder = data_dir / "runs" / run_id
        assert json.loads((folder / "summary.json").read_text())["rounds"] == rounds
        assert sorted(p.name for p in (folder / "checkpoints").glob("round-*.safetensors"))
        assert (folder / "run.sqlite").exists()
    # The run from the coordinator's own config keeps the data_dir itself.
    assert (data_dir / "summary.json").exists() and (data_dir / "checkpoints").is_dir()
    # Distinct runs, distinct models: the first rounds of the two runs differ.
    first_sums = {results[r]["metrics"][0]["checksum"] for r in ("first", "second")}
    assert len(first_sums) == 2


def test_queue_states_and_cancel(tmp_path: Path) -> None:
    queue = RunQueue(tmp_path / "queue.sqlite")
    for name in ("a", "b", "c"):
        queue.submit(name, "{}")
    queue.start("a")
    assert queue.running().run_id == "a" and queue.next_queued().run_id == "b"
    changed, message, _ = queue.request_cancel("b", "not needed")
    assert changed and "before it started" in message and queue.get("b").state == "cancelled"
    assert queue.next_queued().run_id == "c"
    changed, message, state = queue.request_cancel("a", "stop it")
    assert changed and state == "running" and queue.get("a").state == "running"  # the host ends it
    assert not queue.request_cancel("b", "again")[0]
    assert not queue.request_cancel("nope", "")[0]
    queue.close()
    reopened = RunQueue(tmp_path / "queue.sqlite")  # a restarted coordinator sees the same queue
    assert [e.state for e in reopened.all()] == ["running", "cancelled", "queued"]
    reopened.close()
