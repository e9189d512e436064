"""Shared by the security tests: run a LocalCluster with honest workers and one hostile worker, and
read back what the operator would see (status, events, metrics, logs)."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antorcha.experiments.cluster import LocalCluster
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb

# A small fixed-H run of three workers (two honest, one hostile) that finishes in five rounds.
SMALL_RUN: dict[str, Any] = {
    "model_size": "nano",
    "seq_len": 32,
    "batch_size": 4,
    "inner_steps": 8,
    "round_mode": "fixed_steps",
    "inner_warmup_steps": 2,
    "min_workers": 3,
    "max_rounds": 5,
    "round_deadline_s": 120.0,
    "allreduce_timeout_s": 10.0,
}


@dataclass
class Outcome:
    status: pb.RunStatus
    logs: dict[str, str]
    ids: dict[str, str]
    events: list[dict[str, Any]]
    metrics: str

    def metric(self, name: str, label: str, value: str) -> float:
        m = re.search(rf'^{name}\{{{label}="{value}"\}} (\S+)$', self.metrics, re.MULTILINE)
        assert m is not None, (name, label, value)
        return float(m.group(1))

    def events_of(self, name: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind and e["worker_id"] == self.ids[name]]

    def rounds_agree(self, name: str, rounds: range) -> None:
        """`name` averaged each round and its θ checksum equals the coordinator's (CONTINUE/STOP)."""
        done = {int(m[1]): m[2] for m in re.finditer(r"round=(\d+) done .* -> (\w+)", self.logs[name])}
        for r in rounds:
            assert done.get(r) in ("continue", "stop"), (name, r, done)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:  # the loopback dashboard
        return bytes(r.read())


def run_cluster(
    workdir: Path, run: dict[str, Any], honest: tuple[str, ...], hostile: dict[str, list[dict[str, Any]]]
) -> Outcome:
    cluster = LocalCluster(workdir, run=run, coordinator={"lease_s": 10.0})
    try:
        cluster.start_coordinator()
        for name in honest:
            cluster.start_worker(name)
        for name, plan in hostile.items():
            cluster.start_worker(name, {"fault_plan": json.dumps(plan)})
        status = cluster.wait_for(
            lambda s: s.phase == "finished" and all(math.isfinite(r.eval_loss) for r in s.rounds), 300
        )
        base = f"http://{cluster.http_address}"
        events = json.loads(_get(f"{base}/api/events?limit=500"))["events"]
        metrics = _get(f"{base}/metrics").decode()
        cluster.wait_workers(60)
        names = (*honest, *hostile)
        logs = {n: (workdir / f"{n}.log").read_text(errors="replace") for n in names}
        ids = {n: (workdir / f"{n}.id").read_text().strip() for n in names}
        return Outcome(status, logs, ids, events, metrics)
    finally:
        cluster.stop()
