"""`antorcha experiment run` end to end with real processes: a tiny sweep (two H values) and its DDP
baseline is interrupted with SIGTERM while its last run trains, then run again; finished runs are not
redone, the interrupted one is redone from scratch, and the report's numbers match the results."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# H = 10 first: the run interrupted is then H = 5, whose 4 rounds leave time to stop it half-way.
SPEC = """
name = "tiny"
description = "Two H values and the DDP baseline, tiny."
baseline_evals = 4
[run]
model_size = "nano"
seq_len = 32
batch_size = 4
inner_warmup_steps = 2
eval_batches = 2
corpus_max_bytes = 200000
round_mode = "fixed_steps"
outer_lr = 1.0
outer_momentum = 0.5
allreduce_timeout_s = 20.0
round_deadline_s = 60.0
[budget]
steps_per_worker = 20
[cluster]
workers = 2
run_timeout_s = 120.0
[sweep.run]
inner_steps = [10, 5]
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _start(spec: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "antorcha", "experiment", "run", str(spec), "--out", str(out)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _processes_under(path: Path) -> list[int]:
    """Live processes whose command line mentions `path` (cluster processes carry their config path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_sweep_is_interrupted_and_resumed_without_redoing_finished_runs(tmp_path: Path) -> None:
    spec, out = tmp_path / "tiny.toml", tmp_path / "out"
    spec.write_text(SPEC)
    plan = subprocess.run(
        [sys.executable, "-m", "antorcha", "experiment", "plan", str(spec)], capture_output=True, text=True
    )
    assert plan.returncode == 0, plan.stderr
    ddp_id = next(line.split()[0] for line in plan.stdout.splitlines() if line.startswith("ddp-"))
    first, interrupted = "inner_steps-10", "inner_steps-5"

    proc = _start(spec, out, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 150
        # Stop once the last run has recorded a round: two runs are done, one is half-way.
        while not any(r["run_id"] == interrupted for r in _rows(out)):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the sweep did not reach its last run in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 130, (tmp_path / "first.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1.0)
    assert _processes_under(out) == [], "an interrupted sweep left cluster processes behind"
    assert not (out / "runs" / interrupted / "done.json").exists()
    partial = [r for r in _rows(out) if r["run_id"] == interrupted]
    assert 1 <= len(partial) < 4, "the interrupted run should have recorded some but not all rounds"

    finished = {run_id: out / "runs" / run_id / "done.json" for run_id in (ddp_id, first)}
    before = {run_id: (p.read_bytes(), p.stat().st_mtime_ns) for run_id, p in finished.items()}
    coordinator_log = out / "runs" / first / "coordinator.log"
    log_before = coordinator_log.stat().st_mtime_ns

    second = _start(spec, out, tmp_path / "second.log")
    try:
        assert second.wait(150) == 0, (tmp_path / "second.log").read_text()
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    text = (tmp_path / "second.log").read_text()
    assert f"skip {ddp_id}" in text and f"skip {first}" in text, text
    assert "2 skipped" in text, text
    # Not redone: the done markers are byte-identical and untouched, the first cluster never restarted.
    for run_id, path in finished.items():
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before[run_id], run_id
    assert coordinator_log.stat().st_mtime_ns == log_before
    assert (out / "runs" / interrupted / "done.json").exists()

    rows = _rows(out)
    keys = [(r["run_id"], r["round"]) for r in rows]
    assert len(keys) == len(set(keys)), "a round was recorded twice"
    ids = (ddp_id, first, interrupted)
    counts = {run_id: sum(1 for r in rows if r["run_id"] == run_id) for run_id in ids}
    assert counts == {ddp_id: 4, first: 2, interrupted: 4}
    assert all(r["replicas_consistent"] for r in rows)

    for name in ("loss_vs_tokens", "loss_vs_time", "bytes_per_token", "utilisation", "overview"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    report = (out / "report.md").read_text()
    assert "Trend: from H = 5 to H = 10" in report and "| H=5 |" in report and "| DDP |" in report

    with open(out / "summary.csv") as f:
        summary = {row["run_id"]: row for row in csv.DictReader(f)}
    assert set(summary) == {ddp_id, first, interrupted}
    tokens = {int(row["tokens"]) for row in summary.values()}
    assert tokens == {2 * 20 * 4 * 32}, "both arms must train the same tokens"
    for run_id, row in summary.items():
        last = [r for r in rows if r["run_id"] == run_id][-1]
        assert math.isclose(float(row["final_eval_loss"]), last["eval_loss"], rel_tol=1e-12)
        assert int(row["tokens"]) == last["tokens"] and int(row["bytes"]) == last["bytes"]
        assert math.isclose(float(row["bytes_per_token"]), last["bytes"] / last["tokens"], rel_tol=1e-12)
    base_bpt = float(summary[ddp_id]["bytes_per_token"])
    for run_id, h in ((first, 10), (interrupted, 5)):
        reduction = float(summary[run_id]["traffic_reduction_vs_baseline"])
        assert math.isclose(reduction, base_bpt / float(summary[run_id]["bytes_per_token"]), rel_tol=1e-12)
        assert reduction > h / 4, f"H={h} should cut traffic by roughly H against DDP, got {reduction:.2f}x"
    assert float(summary[first]["bytes_per_token"]) < float(summary[interrupted]["bytes_per_token"])
