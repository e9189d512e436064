"""The dashboard's JSON documents, built from a coordinator's state on its event loop.

Every answer is bounded whatever the length of the run or the number of workers seen: the round log is
paged (`rounds`) or downsampled to a fixed number of points (`series`), the timeline covers a window of
recent rounds, the events are the newest ones. `status_document` is also what `antorcha status --json`
prints (from the same `RunStatus` message, fetched over gRPC), so the CLI and the dashboard agree.

Floats that are not finite (a loss before the first round) become null: browsers refuse NaN in JSON.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from antorcha.coordinator.service import rounds_page, run_status
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from antorcha.coordinator.core import CoordinatorCore, RoundLog

MAX_ROUNDS_PAGE = 1000
MAX_SERIES_POINTS = 2000
MAX_TIMELINE_ROUNDS = 100
MAX_EVENTS = 1000


def num(x: float) -> float | None:
    """A float for JSON: None when not finite."""
    return x if math.isfinite(x) else None


def _worker_row(w: pb.WorkerStatus) -> dict[str, Any]:
    return {
        "worker_id": w.worker_id,
        "name": w.name,
        "state": w.state,
        "detail": w.detail,
        "device": {"kind": w.device.kind, "name": w.device.name, "memory_bytes": w.device.memory_bytes},
        "tokens_per_second": num(w.progress.tokens_per_second),
        "seconds_since_heartbeat": num(w.seconds_since_heartbeat),
        "rounds_contributed": w.rounds_contributed,
        "tokens": w.tokens,
        "round": w.progress.round,
        "inner_step": w.progress.inner_step,
        "loss": num(w.progress.loss),
    }


def _round_row(r: pb.RoundRecord | RoundLog) -> dict[str, Any]:
    """One round, from the gRPC record (the CLI) or the core's log entry (the API): the same dict."""
    consistent = r.replicas_consistent if isinstance(r, pb.RoundRecord) else r.consistent
    return {
        "round": r.round,
        "workers": r.workers,
        "tokens": r.tokens,
        "train_loss": num(r.train_loss),
        "eval_loss": num(r.eval_loss),
        "data_plane_bytes": r.data_plane_bytes,
        "seconds": num(r.seconds),
        "tokens_per_second": num(r.tokens / r.seconds) if r.seconds > 0 else None,
        "replicas_consistent": consistent,
        "checksum": r.checksum,
    }


_STATUS_FIELDS = (
    "run_id", "round", "phase", "paused", "max_rounds", "rounds_total", "tokens", "data_plane_bytes",
    "state_bytes", "control_plane_bytes", "replicas_consistent", "joins", "leaves", "crashes", "resyncs",
    "restarts", "evictions", "rejected_requests", "epoch", "shards_trained", "num_data_shards",
)  # fmt: skip


def status_document(status: pb.RunStatus) -> dict[str, Any]:
    """The run at a glance: what `/api/status` answers and `antorcha status --json` prints."""
    doc: dict[str, Any] = {name: getattr(status, name) for name in _STATUS_FIELDS}
    doc.update(
        initial_eval_loss=num(status.initial_eval_loss),
        train_loss=num(status.train_loss),
        eval_loss=num(status.eval_loss),
        tokens_per_second=num(status.tokens_per_second),
        active_workers=sum(1 for w in status.workers if w.state in ("training", "averaging", "waiting")),
        workers=[_worker_row(w) for w in status.workers],
        rounds=[_round_row(r) for r in status.rounds],
    )
    return doc


class DashboardApi:
    """The documents of one coordinator, with the downsampled series cached between rounds."""

    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core
        self._series_key: tuple[Any, ...] | None = None
        self._series: dict[str, Any] = {}

    def status(self) -> dict[str, Any]:
        return status_document(run_status(self.core, rounds_limit=0))

    def workers(self) -> dict[str, Any]:
        doc = self.status()
        return {"round": doc["round"], "workers": doc["workers"]}

    def rounds(self, since: int | None, limit: int) -> dict[str, Any]:
        """A page of the round log: the oldest `limit` rounds ≥ `since`, or the newest `limit`."""
        page = rounds_page(self.core, since, max(0, min(limit, MAX_ROUNDS_PAGE)))
        return {"rounds_total": len(self.core.history), "rounds": [_round_row(h) for h in page]}

    def series(self, points: int) -> dict[str, Any]:
        """The whole round log as at most `points` points per column, each the mean of `stride`
        consecutive rounds (the round column holds each bucket's last round)."""
        points = max(10, min(points, MAX_SERIES_POINTS))
        history = self.core.history
        key = (points, len(history), *((h.round, num(h.eval_loss), h.data_plane_bytes) for h in history[-2:]))
        if key != self._series_key:
            self._series = downsample(history, points)
            self._series_key = key
        return self._series

    def timeline(self, rounds: int) -> dict[str, Any]:
        """Per worker and round: seconds computing (inner steps), averaging (all-reduce, outer step and
        commit) and the rest of the round (waiting for the others), for the newest `rounds` rounds.

        Columnar, to stay small with many workers: `workers` lists each worker once; each round's
        `compute`, `averaging` and `tokens` hold one value per worker in that order (null: the worker
        was not in the round's group, or has not committed yet). Seconds are rounded to milliseconds.
        """
        rounds = max(1, min(rounds, MAX_TIMELINE_ROUNDS))
        core = self.core
        entries = core.history[-rounds:]
        timings = [core.telemetry.timings.get(entry.round, {}) for entry in entries]
        names = {w.worker_id: w.name for w in core.members.workers.values()}
        ids = sorted({w for t in timings for w in t}, key=lambda w: (names.get(w, w), w))

        def ms(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, 3)

        out = []
        for entry, timing in zip(entries, timings, strict=True):
            got = [timing.get(w) for w in ids]
            out.append(
                {
                    "round": entry.round,
                    "seconds": ms(entry.seconds),
                    "compute": [None if t is None else ms(t.compute_seconds) for t in got],
                    "averaging": [None if t is None else ms(t.averaging_seconds) for t in got],
                    "tokens": [None if t is None else t.tokens for t in got],
                }
            )
        return {"workers": [{"worker_id": w, "name": names.get(w, w)} for w in ids], "rounds": out}

    def events(self, limit: int) -> dict[str, Any]:
        limit = max(0, min(limit, MAX_EVENTS))
        events = self.core.telemetry.recent_events(limit)
        return {
            "events": [
                {
                    "at": e.at,
                    "kind": e.kind,
                    "worker_id": e.worker_id,
                    "round": e.round,
                    "detail": e.detail,
                    "count": e.count,
                }
                for e in reversed(events)  # newest first
            ]
        }


def downsample(history: list[RoundLog], points: int) -> dict[str, Any]:
    """Columns of the round log, averaged over buckets of `stride` rounds so that at most `points`
    remain. Non-finite values are left out of a bucket's mean (null when a bucket has none)."""
    n = len(history)
    stride = max(1, math.ceil(n / points))
    columns: dict[str, list[Any]] = {
        "round": [],
        "train_loss": [],
        "eval_loss": [],
        "tokens_per_second": [],
        "data_plane_bytes": [],
        "seconds": [],
        "workers": [],
    }

    def mean(values: list[float]) -> float | None:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else None

    for start in range(0, n, stride):
        bucket = history[start : start + stride]
        columns["round"].append(bucket[-1].round)
        columns["train_loss"].append(mean([h.train_loss for h in bucket]))
        columns["eval_loss"].append(mean([h.eval_loss for h in bucket]))
        columns["tokens_per_second"].append(
            mean([h.tokens / h.seconds if h.seconds > 0 else math.nan for h in bucket])
        )
        columns["data_plane_bytes"].append(mean([float(h.data_plane_bytes) for h in bucket]))
        columns["seconds"].append(mean([h.seconds for h in bucket]))
        columns["workers"].append(mean([float(h.workers) for h in bucket]))
    return {"stride": stride, "rounds_total": n, **columns}


def bind_metrics(core: CoordinatorCore) -> None:
    """Point the coordinator's gauges at its state (read when /metrics is scraped)."""
    telemetry = core.telemetry

    def last_train_loss() -> float:
        return core.history[-1].train_loss if core.history else math.nan

    def last_eval_loss() -> float:
        return next((h.eval_loss for h in reversed(core.history) if math.isfinite(h.eval_loss)), math.nan)

    def utilisation() -> float:
        last = core.history[-1] if core.history else None
        return math.nan if last is None else telemetry.utilisation(last.round, last.seconds)

    telemetry.metrics.bind(
        round_=lambda: core.rounds.round,
        active_workers=lambda: len(core.members.active()),
        train_loss=last_train_loss,
        eval_loss=last_eval_loss,
        utilisation=utilisation,
        checkpoint_age=telemetry.checkpoint_age,
    )
