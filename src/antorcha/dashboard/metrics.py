"""The Prometheus metrics of a coordinator and of a worker, each in a registry of its own (never the
process-global default one), so that several of them can live in one process, as in tests.

Names are fixed: Grafana dashboards and alerts use them (deploy/grafana). Labels have a handful of
known values each: `plane` (data: pseudo-gradient averaging over hivemind; control: all other gRPC;
state: downloads of the global state), `event` (join, leave, crash, evict) and `reason` (why a
request was refused). Each process exports the metrics that mean something for it:

| metric | coordinator | worker |
|---|---|---|
| antorcha_round | round being trained | round this worker trains |
| antorcha_active_workers | workers holding a lease | — |
| antorcha_tokens_total | tokens of closed rounds | tokens this worker trained |
| antorcha_train_loss | mean over the last closed round | this worker's last inner step |
| antorcha_eval_loss | held-out loss after the newest round | — |
| antorcha_inner_step_seconds | — | each inner step |
| antorcha_outer_step_seconds | group formed → round closed | all-reduce → outer step → commit |
| antorcha_bytes_{sent,received}_total{plane} | its own traffic | its own traffic |
| antorcha_worker_events_total{event} | joins, leaves, crashes, evictions | — |
| antorcha_rejected_requests_total{reason} | refused RPCs | — |
| antorcha_compute_utilisation | workers' compute share of the last round | compute share of wall time |
| antorcha_checkpoint_age_seconds | since the newest checkpoint | — |
| antorcha_excluded_workers_total{reason} | pseudo-gradients left out (EXCLUDE_REASONS) | — |
| antorcha_spot_checks_total{result} | spot checks passed / failed | — |
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

PLANES = ("data", "control", "state")
WORKER_EVENTS = ("join", "leave", "crash", "evict")
REJECT_REASONS = (
    "protocol_version",
    "invalid_argument",
    "unknown_worker",
    "evicted",
    "run_finished",
    "late_report",
    "unauthenticated",
    "permission_denied",
    "rate_limited",
    "malformed",
    "impossible_claim",
)
# Why a worker's pseudo-gradient was left out of a round (antorcha_excluded_workers_total): its declared
# norm was an outlier, a span measured larger than it declared, a reducer of the coordinator's span left
# it out (NaN/Inf, wrong size, norm outlier), or it failed repeated spot checks (and was evicted).
EXCLUDE_REASONS = ("norm_outlier", "norm_mismatch", "data_plane", "spot_check")
SPOT_CHECK_RESULTS = ("pass", "fail")
METRIC_NAMES = (
    "antorcha_round",
    "antorcha_active_workers",
    "antorcha_tokens_total",
    "antorcha_train_loss",
    "antorcha_eval_loss",
    "antorcha_inner_step_seconds",
    "antorcha_outer_step_seconds",
    "antorcha_bytes_sent_total",
    "antorcha_bytes_received_total",
    "antorcha_worker_events_total",
    "antorcha_rejected_requests_total",
    "antorcha_compute_utilisation",
    "antorcha_checkpoint_age_seconds",
    "antorcha_excluded_workers_total",
    "antorcha_spot_checks_total",
)
# Inner steps run from milliseconds (nano on a GPU) to seconds (1B on a small GPU); a round's
# averaging from a fraction of a second (loopback) to minutes (a slow link).
_INNER_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_OUTER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _Metrics:
    """What both roles export."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("antorcha_round", "The round being trained.", registry=r)
        self.tokens = Counter("antorcha_tokens_total", "Tokens trained.", registry=r)
        self.train_loss = Gauge("antorcha_train_loss", "Training loss (NaN before the first).", registry=r)
        self.outer_step_seconds = Histogram(
            "antorcha_outer_step_seconds",
            "Seconds from a round's all-reduce to its outer step being applied.",
            buckets=_OUTER_BUCKETS,
            registry=r,
        )
        self.bytes_sent = Counter(
            "antorcha_bytes_sent_total", "Bytes this process sent, by plane.", ["plane"], registry=r
        )
        self.bytes_received = Counter(
            "antorcha_bytes_received_total", "Bytes this process received, by plane.", ["plane"], registry=r
        )
        for plane in PLANES:  # every series exists from the first scrape, at 0
            self.bytes_sent.labels(plane)
            self.bytes_received.labels(plane)
        self.compute_utilisation = Gauge(
            "antorcha_compute_utilisation", "Share of wall time spent in inner steps (0-1).", registry=r
        )
        self.train_loss.set(math.nan)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class CoordinatorMetrics(_Metrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.active_workers = Gauge("antorcha_active_workers", "Workers holding a lease.", registry=r)
        self.eval_loss = Gauge(
            "antorcha_eval_loss", "Held-out loss of the newest evaluated round.", registry=r
        )
        self.worker_events = Counter(
            "antorcha_worker_events_total",
            "Workers joining, leaving, crashing, evicted.",
            ["event"],
            registry=r,
        )
        for event in WORKER_EVENTS:
            self.worker_events.labels(event)
        self.rejected = Counter(
            "antorcha_rejected_requests_total", "Requests refused, by reason.", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.checkpoint_age = Gauge(
            "antorcha_checkpoint_age_seconds", "Seconds since the newest checkpoint was written.", registry=r
        )
        # Trust: pseudo-gradients left out (norm outlier, span check, spot checks) and spot-check results.
        self.excluded = Counter(
            "antorcha_excluded_workers_total",
            "Pseudo-gradients left out of a round (or workers evicted by spot checks), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in EXCLUDE_REASONS:
            self.excluded.labels(reason)
        self.spot_checks = Counter(
            "antorcha_spot_checks_total",
            "Spot checks of pseudo-gradients, by result.",
            ["result"],
            registry=r,
        )
        for result in SPOT_CHECK_RESULTS:
            self.spot_checks.labels(result)
        self.eval_loss.set(math.nan)
        self.checkpoint_age.set(math.nan)

    def bind(
        self,
        round_: Callable[[], float],
        active_workers: Callable[[], float],
        train_loss: Callable[[], float],
        eval_loss: Callable[[], float],
        utilisation: Callable[[], float],
        checkpoint_age: Callable[[], float],
    ) -> None:
        """Gauges read the coordinator's state when scraped (in the thread that scrapes: the
        coordinator's event loop), so they are never stale and cost nothing between scrapes."""
        self.round.set_function(round_)
        self.active_workers.set_function(active_workers)
        self.train_loss.set_function(train_loss)
        self.eval_loss.set_function(eval_loss)
        self.compute_utilisation.set_function(utilisation)
        self.checkpoint_age.set_function(checkpoint_age)


class WorkerMetrics(_Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.inner_step_seconds = Histogram(
            "antorcha_inner_step_seconds",
            "Seconds per inner step.",
            buckets=_INNER_BUCKETS,
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics from a daemon thread (training runs in the main thread); returns the port."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
