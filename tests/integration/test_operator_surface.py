"""The operator surface with real processes: a coordinator and two workers on 127.0.0.1, the dashboard
loaded in a real headless Chromium, /metrics of both roles scraped and parsed, and the operator CLI
(`antorcha status --json`, `pause`, `resume`, `evict`) run as subprocesses.

The tests share one cluster and run in file order: the dashboard and metrics while it trains, then a
pause (the status is stable, so the CLI and the JSON API can be compared), a resume, and an eviction.
Nothing here asserts a duration; waits only have generous upper bounds.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from antorcha.dashboard.metrics import METRIC_NAMES
from antorcha.experiments.browser import HeadlessChromium, find_chromium
from antorcha.experiments.cluster import LocalCluster, free_port
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.slow

RUN = {
    "run_id": "ops",
    "model_size": "nano",
    "seq_len": 64,
    "batch_size": 8,
    "inner_steps": 10,
    "inner_warmup_steps": 5,
    "max_rounds": 0,  # until stopped
    "min_workers": 2,
    "round_deadline_s": 120.0,
    "allreduce_timeout_s": 20.0,
    "eval_batches": 2,
}
COORDINATOR_ONLY = {"antorcha_active_workers", "antorcha_eval_loss", "antorcha_worker_events_total"}
COORDINATOR_ONLY |= {"antorcha_rejected_requests_total", "antorcha_checkpoint_age_seconds"}
COORDINATOR_ONLY |= {"antorcha_excluded_workers_total", "antorcha_spot_checks_total"}
WORKER_ONLY = {"antorcha_inner_step_seconds"}


class Ops:
    def __init__(self, cluster: LocalCluster, metrics_ports: dict[str, int]) -> None:
        self.cluster, self.metrics_ports = cluster, metrics_ports

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.cluster.dashboard_url + path, timeout=10) as response:
            return str(response.read().decode())

    def api(self, path: str) -> Any:
        return json.loads(self.get("api/" + path))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "antorcha", *args, "--coordinator", self.cluster.address],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def worker_id(self, name: str) -> str:
        return next(w.worker_id for w in self.cluster.status().workers if w.name == name)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("ops"),
        run=RUN,
        coordinator={"lease_s": 8.0, "data_dir": str(tmp_path_factory.mktemp("ops-data"))},
    )
    ports = {"a": free_port(), "b": free_port()}
    try:
        cluster.start_coordinator()
        for name, port in ports.items():
            cluster.start_worker(name, {"metrics_port": port, "progress": "log", "progress_interval_s": 1.0})
        yield Ops(cluster, ports)
    finally:
        cluster.stop()


def _finished_rounds(status: pb.RunStatus) -> int:
    return sum(1 for r in status.rounds if math.isfinite(r.eval_loss))


async def _load_dashboard(url: str, screenshot: Path) -> dict[str, Any]:
    async with HeadlessChromium(width=1400, height=1000) as browser:
        await browser.navigate(url)
        await browser.wait_for("document.body.dataset.ready === '1'", 60)
        # Wait for what the test asserts: the page polls, so a round closing meanwhile only adds points.
        seen = await browser.wait_for(
            """(() => {
                const names = [...document.querySelectorAll('#workers tbody tr')].map(r => r.dataset.name);
                const points = Number(document.getElementById('loss-chart').dataset.points);
                const round = document.getElementById('round').dataset.round;
                return names.length >= 2 && points >= 2 && round !== ''
                    ? {names, points, round: Number(round),
                       evalPoints: Number(document.getElementById('loss-chart').dataset.evalPoints),
                       canvases: document.querySelectorAll('#loss-chart canvas').length,
                       timelineWorkers: Number(document.getElementById('timeline').dataset.workers),
                       error: document.getElementById('error').hidden ? ''
                           : document.getElementById('error').textContent}
                    : null;
            })()""",
            60,
        )
        await browser.screenshot(screenshot)
        return dict(seen)


@pytest.mark.skipif(find_chromium() is None, reason="needs Chromium (apt-get install chromium; .ci/run does)")
def test_dashboard_in_headless_chromium_shows_workers_loss_curve_and_round(ops: Ops, tmp_path: Path) -> None:
    ops.cluster.wait_for(lambda s: _finished_rounds(s) >= 2, 300)
    before = ops.cluster.status().round
    shot = tmp_path / "dashboard.png"
    seen = asyncio.run(_load_dashboard(ops.cluster.dashboard_url, shot))
    after = ops.cluster.status().round

    assert sorted(seen["names"]) == ["a", "b"]
    assert seen["points"] >= 2 and seen["evalPoints"] >= 2  # train and eval loss per round
    assert seen["canvases"] >= 1  # uPlot drew it
    assert before <= seen["round"] <= after  # the current round, as the coordinator had it
    assert seen["timelineWorkers"] == 2
    assert seen["error"] == ""
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """metric sample name -> labels -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _has(samples: dict[str, Any], name: str) -> bool:
    return any(s == name or s.startswith(name + "_") for s in samples)  # histograms: _bucket, _sum, _count


def test_metrics_of_coordinator_and_worker_parse_exist_and_move(ops: Ops) -> None:
    coordinator_url = ops.cluster.dashboard_url + "metrics"
    worker_url = f"http://127.0.0.1:{ops.metrics_ports['a']}/metrics"
    ops.cluster.wait_for(lambda s: _finished_rounds(s) >= 1, 300)
    first_c, first_w = _scrape(coordinator_url), _scrape(worker_url)

    for name in METRIC_NAMES:
        assert _has(first_c, name) or _has(first_w, name), name
        if name not in WORKER_ONLY:
            assert _has(first_c, name), f"coordinator lacks {name}"
        if name not in COORDINATOR_ONLY:
            assert _has(first_w, name), f"worker lacks {name}"
    for samples in (first_c, first_w):
        planes = {dict(labels)["plane"] for labels in samples["antorcha_bytes_sent_total"]}
        assert {"data", "control"} <= planes
    events = {dict(labels)["event"]: v for labels, v in first_c["antorcha_worker_events_total"].items()}
    assert events["join"] >= 2
    assert first_c["antorcha_active_workers"][()] == 2
    assert first_w["antorcha_inner_step_seconds_count"][()] > 0
    assert math.isfinite(first_c["antorcha_eval_loss"][()])
    assert 0 <= first_c["antorcha_checkpoint_age_seconds"][()] < 3600

    # Counters move: more tokens trained on the worker, and closed on the coordinator.
    deadline = time.monotonic() + 300
    while True:
        now_c, now_w = _scrape(coordinator_url), _scrape(worker_url)
        grew_c = now_c["antorcha_tokens_total"][()] > first_c["antorcha_tokens_total"][()]
        grew_w = now_w["antorcha_tokens_total"][()] > first_w["antorcha_tokens_total"][()]
        if grew_c and grew_w:
            break
        assert time.monotonic() < deadline, "tokens_total did not increase"
        time.sleep(0.5)
    assert now_c["antorcha_round"][()] >= first_c["antorcha_round"][()]


def test_worker_logs_its_progress(ops: Ops) -> None:
    ops.cluster.wait_for(lambda s: _finished_rounds(s) >= 1, 300)
    log = (ops.cluster.workdir / "a.log").read_text()
    line = next(x for x in log.splitlines() if "progress round=" in x)
    for key in ("step=", "tokens_per_s=", "loss=", "sync_in_s="):
        assert key in line, line
    assert f"metrics on http://0.0.0.0:{ops.metrics_ports['a']}/metrics" in log


def test_pause_holds_the_round_counter(ops: Ops) -> None:
    done = ops.cli("pause", "--reason", "maintenance")
    assert done.returncode == 0, done.stderr
    paused = ops.cluster.wait_for(lambda s: s.phase == "paused", 300)
    held = paused.round
    assert paused.paused
    # The round closed before the pause took effect is evaluated, then nothing moves.
    ops.cluster.wait_for(lambda s: all(math.isfinite(r.eval_loss) for r in s.rounds), 120)
    rounds_before = ops.cluster.status().rounds_total
    time.sleep(5.0)  # several rounds' worth of time at this size
    status = ops.cluster.status()
    assert (status.round, status.phase, status.rounds_total) == (held, "paused", rounds_before)
    assert {w.state for w in status.workers} == {"waiting"}
    again = ops.cli("pause")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_status_json_matches_the_dashboard_api(ops: Ops) -> None:
    ops.cluster.wait_for(lambda s: s.phase == "paused", 300)  # a still run: both answers see the same
    done = ops.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    api = ops.api("status")
    for key in ("run_id", "round", "phase", "paused", "rounds_total", "train_loss", "eval_loss", "tokens"):
        assert cli[key] == api[key], key
    assert cli["eval_loss"] is not None and cli["train_loss"] is not None

    def workers(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
        return sorted(
            (w["worker_id"], w["name"], w["state"], w["rounds_contributed"]) for w in doc["workers"]
        )

    assert workers(cli) == workers(api)
    assert len(cli["workers"]) == 2
    # The newest round in the CLI's answer is the newest in the API's round log, losses included.
    newest = ops.api("rounds?limit=1")["rounds"][0]
    assert cli["rounds"][-1] == newest
    assert newest["eval_loss"] == api["eval_loss"] and newest["train_loss"] == api["train_loss"]


def test_resume_continues_the_run(ops: Ops) -> None:
    held = ops.cluster.status().round
    done = ops.cli("resume")
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    status = ops.cluster.wait_for(lambda s: s.round >= held + 2, 300)
    assert not status.paused
    kinds = [e["kind"] for e in ops.api("events?limit=50")["events"]]
    assert "pause" in kinds and "resume" in kinds


def test_evicted_worker_exits_with_a_clear_message_and_may_not_rejoin(ops: Ops) -> None:
    victim = ops.worker_id("b")
    done = ops.cli("evict", victim, "--reason", "flaky GPU")
    assert done.returncode == 0, done.stderr
    assert "evicted" in done.stdout

    proc = ops.cluster.workers["b"]
    assert proc.wait(180) == 3
    log = (ops.cluster.workdir / "b.log").read_text()
    assert f"worker {victim} was evicted" in log and "flaky GPU" in log
    assert "Traceback" not in log

    # The run goes on with the other worker.
    at = ops.cluster.status().round
    status = ops.cluster.wait_for(lambda s: s.round >= at + 2, 300)
    states = {w.name: w.state for w in status.workers}
    assert states["b"] == "evicted" and states["a"] in ("training", "averaging")

    # The same worker (same identity file) is refused at Join.
    again = ops.cluster.start_worker("b")
    assert again.wait(180) == 3
    assert "may not rejoin" in ops.cluster.tail("b", 5)

    doc = ops.api("status")
    assert doc["evictions"] == 1 and doc["rejected_requests"] >= 1
    events = ops.api("events?limit=100")["events"]
    assert any(
        e["kind"] == "evict" and e["worker_id"] == victim and e["detail"] == "flaky GPU" for e in events
    )
    assert any(e["kind"] == "reject" and e["worker_id"] == victim for e in events)
    metrics = _scrape(ops.cluster.dashboard_url + "metrics")
    assert metrics["antorcha_rejected_requests_total"][(("reason", "evicted"),)] >= 1
    assert metrics["antorcha_worker_events_total"][(("event", "evict"),)] == 1


def test_evicting_an_unknown_worker_is_refused(ops: Ops) -> None:
    done = ops.cli("evict", "w-nobody")
    assert done.returncode == 3
    assert "no worker 'w-nobody'" in done.stderr


def test_a_worker_that_cannot_reach_the_coordinator_says_so(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "antorcha", "worker", "--coordinator", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ANTORCHA_WORKER__CONNECT_TIMEOUT_S": "2"},
    )
    assert done.returncode == 4, done.stderr
    assert f"the coordinator at 127.0.0.1:{port} did not answer" in done.stderr
    assert "Traceback" not in done.stderr
