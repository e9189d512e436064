"""The operator surface without processes: the dashboard's JSON documents, the HTTP server on a real
socket, the metrics registries, the operator controls (pause, evict) and what the coordinator records
for them, on a `CoordinatorCore` whose replica and data plane are stand-ins (no torch work here)."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from antorcha.averaging.base import AllReduceResult, PeerDescriptor
from antorcha.config import CoordinatorSettings, RunSpec
from antorcha.coordinator.core import CoordinatorCore, RoundLog
from antorcha.coordinator.membership import WorkerState
from antorcha.coordinator.rounds import Phase, Report
from antorcha.coordinator.service import run_status
from antorcha.coordinator.store import RunStore
from antorcha.dashboard.api import DashboardApi, downsample, status_document
from antorcha.dashboard.http import DashboardServer
from antorcha.dashboard.metrics import METRIC_NAMES, CoordinatorMetrics, WorkerMetrics
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.protocol import DeviceInfo, Progress
from antorcha.worker.progress import ProgressLine, ProgressLog

ROOT = Path(__file__).resolve().parents[2]


def _core(store: RunStore | None = None) -> CoordinatorCore:
    spec = RunSpec(run_id="unit", min_workers=1, max_rounds=0)
    replica = SimpleNamespace(num_data_shards=64)  # all the core asks of a replica outside rounds
    return CoordinatorCore(spec, CoordinatorSettings(), replica, SimpleNamespace(), store)  # type: ignore[arg-type]


def _join(core: CoordinatorCore, name: str) -> str:
    peer = PeerDescriptor(f"peer-{name}", (), True)
    record, _ = core.join(name=name, peer=peer, device=DeviceInfo("cuda", "GPU"), worker_id="")
    return record.worker_id


def _rounds(n: int, start: int = 0) -> list[RoundLog]:
    return [
        RoundLog(
            round=r,
            workers=2,
            tokens=1000,
            train_loss=3.0 - r * 1e-4,
            eval_loss=math.nan if r % 7 == 0 else 3.1 - r * 1e-4,
            data_plane_bytes=5000 + r,
            seconds=2.0,
            checksum=f"c{r}",
        )
        for r in range(start, start + n)
    ]


# ---- documents ----------------------------------------------------------------------------------


def test_downsample_keeps_at_most_the_asked_points_and_averages_buckets() -> None:
    history = _rounds(10_000)
    d = downsample(history, 600)
    assert d["stride"] == 17 and len(d["round"]) <= 600 and d["rounds_total"] == 10_000
    assert d["round"][0] == 16 and d["round"][-1] == 9_999
    bucket = history[:17]
    finite = [h.eval_loss for h in bucket if math.isfinite(h.eval_loss)]
    assert d["eval_loss"][0] == pytest.approx(sum(finite) / len(finite))
    assert d["tokens_per_second"][0] == pytest.approx(500.0)
    assert all(len(column) == len(d["round"]) for k, column in d.items() if isinstance(column, list))

    small = downsample(_rounds(3), 600)
    assert small["stride"] == 1 and small["round"] == [0, 1, 2]
    assert small["eval_loss"][0] is None  # NaN becomes null, not a number the browser cannot parse
    assert downsample([], 600)["round"] == []


def test_round_log_pages_oldest_from_since_or_newest() -> None:
    core = _core()
    core.history = _rounds(50)
    api = DashboardApi(core)
    assert [r["round"] for r in api.rounds(None, 3)["rounds"]] == [47, 48, 49]
    assert [r["round"] for r in api.rounds(10, 3)["rounds"]] == [10, 11, 12]
    assert api.rounds(48, 10)["rounds"][-1]["round"] == 49
    assert api.rounds(60, 10)["rounds"] == []
    assert len(api.rounds(0, 10**9)["rounds"]) == 50  # capped, not refused
    assert api.rounds(0, 5)["rounds_total"] == 50
    # The gRPC page is the same page, and an empty request never returns more than 1000 rounds.
    core.history = _rounds(1500)
    assert [r.round for r in run_status(core, rounds_since=10, rounds_limit=3).rounds] == [10, 11, 12]
    assert len(run_status(core).rounds) == 1000 and run_status(core).rounds[-1].round == 1499
    assert len(run_status(core, rounds_limit=0).rounds) == 0
    assert run_status(core).rounds_total == 1500


def test_status_is_the_same_document_through_grpc_and_has_no_nan() -> None:
    core = _core()
    a, b = _join(core, "alice"), _join(core, "bob")
    core.members.heartbeat(
        a, Progress(round=3, inner_step=4, tokens=10, loss=2.5, tokens_per_second=900.0), 0.0
    )
    core.history = _rounds(3)
    core.history[-1].eval_loss = math.nan  # the newest round's eval is still running
    doc = DashboardApi(core).status()
    json.dumps(doc, allow_nan=False)
    wire = pb.RunStatus.FromString(run_status(core, rounds_limit=0).SerializeToString())
    from_grpc = status_document(wire)
    for key in ("round", "phase", "train_loss", "eval_loss", "tokens", "rounds_total", "initial_eval_loss"):
        assert from_grpc[key] == doc[key], key
    assert [w["worker_id"] for w in doc["workers"]] == [a, b]
    assert doc["eval_loss"] == pytest.approx(3.1 - 1e-4)  # the newest *evaluated* round
    assert doc["initial_eval_loss"] is None
    assert doc["tokens_per_second"] == 900.0 and doc["active_workers"] == 2
    assert doc["workers"][0]["loss"] == 2.5 and doc["workers"][1]["loss"] is None


def test_history_totals_match_a_plain_sum_while_the_newest_rounds_change() -> None:
    core = _core()
    core.history = _rounds(30)
    status = run_status(core, rounds_limit=0)
    assert status.tokens == 30_000 and status.data_plane_bytes == sum(5000 + r for r in range(30))
    core.history[-1].data_plane_bytes += 7  # a late commit adds its bytes to the newest round
    core.history[-2].commits["w-x"] = "differs"
    core.history += _rounds(5, start=30)
    status = run_status(core, rounds_limit=0)
    assert status.data_plane_bytes == sum(h.data_plane_bytes for h in core.history)
    assert status.tokens == 35_000 and not status.replicas_consistent
    core.history = _rounds(4)  # a restart cut the log
    assert run_status(core, rounds_limit=0).tokens == 4000


def test_timeline_is_columnar_and_events_newest_first() -> None:
    core = _core()
    a, b = _join(core, "alice"), _join(core, "bob")
    core.history = _rounds(2)
    core.telemetry.report(a, 1, 700, 1.23456)
    core.telemetry.report(b, 1, 300, 0.5)
    core.telemetry.commit(a, 1, 0.25)
    doc = DashboardApi(core).timeline(5)
    assert doc["workers"] == [{"worker_id": a, "name": "alice"}, {"worker_id": b, "name": "bob"}]
    nobody = [None, None]
    assert doc["rounds"][0] == {
        "round": 0, "seconds": 2.0, "compute": nobody, "averaging": nobody, "tokens": nobody
    }  # fmt: skip
    assert doc["rounds"][1]["compute"] == [1.235, 0.5] and doc["rounds"][1]["averaging"] == [0.25, None]
    events = DashboardApi(core).events(10)["events"]
    assert [e["kind"] for e in events] == ["join", "join"] and events[0]["worker_id"] == b


def test_series_are_cached_until_the_log_changes() -> None:
    core = _core()
    core.history = _rounds(100)
    api = DashboardApi(core)
    first = api.series(50)
    assert api.series(50) is first
    core.history[-1].eval_loss = 1.0  # the newest round's eval arrived
    second = api.series(50)
    assert second is not first and second["eval_loss"][-1] != first["eval_loss"][-1]
    core.history.append(_rounds(1, start=100)[0])
    assert api.series(50)["rounds_total"] == 101


# ---- operator controls --------------------------------------------------------------------------


def test_pause_makes_lease_requests_wait_and_resume_lets_them_through() -> None:
    core = _core()
    a = _join(core, "alice")
    core.tick(0.0)
    assert core.rounds.phase == Phase.TRAINING
    assert core.operator.pause("maintenance")[0]
    core.rounds.report(0, Report(a, 10, 1, 2.0, 1.0))
    core.rounds.phase, core.rounds.reports = Phase.AVERAGING, {}
    core.rounds.close(1.0, {a})
    assert core.rounds.phase == Phase.PAUSED
    waiting = core.lease_data(a, 1, 0)
    assert waiting.wait and waiting.lease is None and "paused by the operator; round 1" in waiting.reason
    assert core.operator.resume()[0]
    core.tick(2.0)
    granted = core.lease_data(a, 1, 0)
    assert not granted.wait and granted.lease is not None
    kinds = [e.kind for e in core.telemetry.events]
    assert kinds[-2:] == ["pause", "resume"]


def test_a_round_waiting_for_workers_tells_them_to_wait() -> None:
    core = CoordinatorCore(
        RunSpec(min_workers=2), CoordinatorSettings(), SimpleNamespace(num_data_shards=8), SimpleNamespace()
    )  # type: ignore[arg-type]
    a = _join(core, "alice")
    core.tick(0.0)
    outcome = core.lease_data(a, 0, 0)
    assert outcome.wait and "enough workers" in outcome.reason


def test_evict_releases_leases_withdraws_the_report_and_is_refused_after(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.sqlite")
    store.bind_run("{}", "x")
    core = _core(store)
    a, b = _join(core, "alice"), _join(core, "bob")
    core.tick(0.0)
    assert core.lease_data(b, 0, 0).lease is not None
    core.rounds.report(0, Report(b, 10, 1, 2.0, 1.0))
    changed, message = core.operator.evict(b, "flaky GPU")
    assert changed and "flaky GPU" in message
    assert core.ledger.held(b, 0) == [] and b not in core.rounds.reports
    assert core.members.workers[b].state == WorkerState.EVICTED
    assert core._active_ids() == {a}
    refusal = core.operator.refusal(b)
    assert f"worker {b} was evicted" in refusal and "flaky GPU" in refusal and "may not rejoin" in refusal
    assert core.operator.refusal(a) == ""
    assert core.operator.evict(b)[0] is False
    assert run_status(core, rounds_limit=0).evictions == 1

    # After a restart, from the same store: still evicted, and the pause too.
    core.operator.pause()
    restarted = _core(store)
    store.load_members(restarted.members, 0.0)
    restarted.operator.restore()
    assert restarted.operator.refusal(b) == refusal
    assert restarted.rounds.paused and restarted.rounds.phase == Phase.PAUSED
    store.close()


def test_a_restart_inside_the_lease_counts_one_crash_and_frees_what_the_dead_process_held() -> None:
    core = _core()
    a = _join(core, "alice")
    core.tick(0.0)
    assert core.lease_data(a, 0, 0).lease is not None
    device = DeviceInfo("cuda", "GPU")
    # The same process joining again (say after a coordinator restart) keeps its peer: no crash.
    core.join(name="alice", peer=PeerDescriptor("peer-alice", (), True), device=device, worker_id=a)
    assert core.counters.crashes == 0 and core.ledger.held(a, 0) != []
    # A new process under the same identity, while the old one still holds the lease: the old one died.
    core.join(name="alice", peer=PeerDescriptor("peer-alice-2", (), True), device=device, worker_id=a)
    assert core.counters.crashes == 1 and core.ledger.held(a, 0) == []
    assert core.members.workers[a].peer.peer_id == "peer-alice-2"
    crash = [e for e in core.telemetry.recent_events(10) if e.kind == "crash"]
    assert len(crash) == 1 and crash[0].worker_id == a and "old peer peer-alice)" in crash[0].detail
    core.tick(1.0)  # the lease the new process holds is fresh: nothing expires, nothing counted twice
    assert core.counters.crashes == 1 and run_status(core, rounds_limit=0).crashes == 1


def test_evicting_a_member_of_the_averaging_group_keeps_its_shards_of_that_round() -> None:
    core = _core()
    a, b = _join(core, "alice"), _join(core, "bob")
    core.tick(0.0)
    lease = core.lease_data(b, 0, 0).lease
    core.rounds.report(0, Report(a, 10, 1, 2.0, 1.0))
    core.rounds.report(0, Report(b, 10, 1, 2.0, 1.0))
    core.rounds.tick(1.0, {a, b})
    assert core.rounds.phase == Phase.AVERAGING
    core.operator.evict(b)
    assert core.ledger.held(b, 0) == [lease]  # its Δ is in this round's average
    assert [s.shard for s in core.ledger.complete_round(0, {a, b}) if s.worker_id == b] == [lease.shard]


def test_refusals_are_counted_by_reason_and_repeats_folded() -> None:
    core = _core()
    for _ in range(3):
        core.telemetry.reject("evicted", "go away", "w-1")
    core.telemetry.reject("invalid_argument", "bad", "w-2")
    events = [e for e in core.telemetry.events if e.kind == "reject"]
    assert [(e.worker_id, e.count) for e in events] == [("w-1", 3), ("w-2", 1)]
    assert core.telemetry.rejected == 4
    samples = _samples(core.telemetry.metrics.exposition().decode())
    assert samples["antorcha_rejected_requests_total"][(("reason", "evicted"),)] == 3


def test_timings_are_flushed_to_the_store_and_restored(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.sqlite")
    core = _core(store)
    core.telemetry.report("w-a", 4, 100, 1.5)
    core.telemetry.commit("w-a", 4, 0.5)
    core.telemetry.flush()
    core.telemetry.event("join", "w-a", 4, "hello")
    again = _core(store)
    again.telemetry.restore(current_round=5)
    assert again.telemetry.timings[4]["w-a"].averaging_seconds == 0.5
    assert [(e.kind, e.detail) for e in again.telemetry.events] == [("join", "hello")]
    store.truncate_after(4)
    assert store.load_round_workers(0) == []
    store.close()


# ---- metrics ------------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_registries_are_per_instance_and_cover_every_metric_name() -> None:
    one, two, worker = CoordinatorMetrics(), CoordinatorMetrics(), WorkerMetrics()  # no collision
    one.tokens.inc(5)
    assert _samples(two.exposition().decode())["antorcha_tokens_total"][()] == 0
    names = set(_samples(one.exposition().decode())) | set(_samples(worker.exposition().decode()))
    for name in METRIC_NAMES:
        assert any(n == name or n.startswith(name + "_") for n in names), name
    planes = {dict(k)["plane"] for k in _samples(worker.exposition().decode())["antorcha_bytes_sent_total"]}
    assert planes == {"data", "control", "state"}


def test_grafana_and_the_deploy_checks_use_the_names_exported_here() -> None:
    path = ROOT / "tests" / "unit" / "test_deploy_files.py"
    spec = importlib.util.spec_from_file_location("deploy_checks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert set(module.METRICS) == set(METRIC_NAMES)


# ---- HTTP ---------------------------------------------------------------------------------------


async def _fetch_all(core: CoordinatorCore) -> dict[str, Any]:
    server = DashboardServer(core, "127.0.0.1", 0)
    port = await server.start()
    base = f"http://127.0.0.1:{port}/"
    got: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("", "static/uPlot.iife.min.js", "static/nope.js", "api/status", "api/rounds?limit=x",
                         "api/series?points=100", "metrics", "healthz"):  # fmt: skip
                async with session.get(base + path) as response:
                    got[path] = (
                        response.status,
                        response.headers.get("Content-Type", ""),
                        await response.text(),
                    )
    finally:
        await server.stop()
    return got


def test_http_server_serves_the_page_its_files_the_api_and_metrics() -> None:
    core = _core()
    _join(core, "alice")
    core.history = _rounds(5)
    core.telemetry.round_closed(core.history[-1], {}, AllReduceResult(average=None, bytes_sent=10), 1.0)  # type: ignore[arg-type]
    got = asyncio.run(_fetch_all(core))
    status, kind, page = got[""]
    assert status == 200 and kind.startswith("text/html") and "static/app.js" in page
    assert got["static/uPlot.iife.min.js"][0] == 200 and "uPlot" in got["static/uPlot.iife.min.js"][2]
    assert got["static/nope.js"][0] == 404
    assert got["api/rounds?limit=x"][0] == 400
    doc = json.loads(got["api/status"][2])
    assert doc["rounds_total"] == 5 and doc["workers"][0]["name"] == "alice"
    assert len(json.loads(got["api/series?points=100"][2])["round"]) == 5
    samples = _samples(got["metrics"][2])
    assert samples["antorcha_round"][()] == 0 and samples["antorcha_active_workers"][()] == 1
    assert samples["antorcha_tokens_total"][()] == 1000
    assert samples["antorcha_train_loss"][()] == pytest.approx(3.0 - 4e-4)
    assert samples["antorcha_worker_events_total"][(("event", "join"),)] == 1
    assert got["healthz"][0] == 200


# ---- worker progress display --------------------------------------------------------------------


def test_progress_line_and_log_lines_share_the_terminal_without_garbling() -> None:
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        line = ProgressLine(terminal)  # type: ignore[arg-type]
        line.show("round 1 · step 3")
        logging.getLogger("antorcha.test").warning("something happened")
        line.close()
    finally:
        root.removeHandler(handler)
    out = terminal.getvalue()
    # The line is erased before the log record and drawn again after it.
    assert out == "\r\x1b[Kround 1 · step 3\r\x1b[Ksomething happened\nround 1 · step 3\r\x1b[K"


def test_progress_log_writes_at_most_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    display = ProgressLog(interval_s=3600)
    with caplog.at_level(logging.INFO, logger="antorcha.worker.progress"):
        display.show("round=1 step=1")
        display.show("round=1 step=2")
    assert [r.getMessage() for r in caplog.records] == ["progress round=1 step=1"]
