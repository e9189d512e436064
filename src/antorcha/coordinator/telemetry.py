"""What the coordinator records for its operators and does not need to run: the recent events (joins,
leaves, crashes, evictions, refusals, ...), each worker's compute and averaging seconds per round (the
dashboard's timeline), tokens per worker, the age of the newest checkpoint, and the Prometheus
metrics. The core and the servicer feed it; the dashboard and `/metrics` read it.

Memory stays bounded whatever the length of the run: the newest `events_kept` events and the
timings of the newest `timing_rounds_kept` rounds are kept here; the store keeps all of them.
Refusals are counted, and kept only in memory (a misbehaving client could otherwise fill the disk),
with repeats of the same refusal folded into one event with a count.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from antorcha.averaging.base import AllReduceResult
from antorcha.coordinator.store import RunStore
from antorcha.dashboard.metrics import WORKER_EVENTS, CoordinatorMetrics

# Round log entries older than this many rounds no longer change: commits of rounds that far back are
# answered "unknown round" by the core, so their bytes and consistency are final.
_SETTLED_ROUNDS = 8


@dataclass
class Event:
    at: float  # unix time
    kind: str  # join, leave, crash, evict, reject, resync, pause, resume, restart, checkpoint_failed,
    # exclude (a pseudo-gradient left out of a round), spot_check_failed
    worker_id: str = ""
    round: int | None = None
    detail: str = ""
    count: int = 1  # the same refusal repeated, folded into one event


@dataclass
class WorkerTiming:
    tokens: int
    compute_seconds: float
    averaging_seconds: float | None = None  # known once the worker commits


class Telemetry:
    def __init__(
        self, store: RunStore | None = None, events_kept: int = 1000, timing_rounds_kept: int = 200
    ) -> None:
        self.store = store
        self.metrics = CoordinatorMetrics()
        self.events: deque[Event] = deque(maxlen=events_kept)
        self.timing_rounds_kept = timing_rounds_kept
        self.timings: dict[int, dict[str, WorkerTiming]] = {}  # round -> worker -> timing
        self._unsaved: set[int] = set()  # rounds whose timings changed since the last flush
        self.worker_tokens: dict[str, int] = {}  # tokens in closed rounds, since this process started
        self.rejected = 0
        self.last_checkpoint_at = math.nan  # unix time
        self._settled: tuple[int, int, int, bool] = (0, 0, 0, True)  # entries, tokens, bytes, consistent

    # ---- events ----------------------------------------------------------------------------------

    def event(
        self,
        kind: str,
        worker_id: str = "",
        round_: int | None = None,
        detail: str = "",
        persist: bool = True,
    ) -> None:
        self.events.append(Event(time.time(), kind, worker_id, round_, detail))
        if kind in WORKER_EVENTS:
            self.metrics.worker_events.labels(kind).inc()
        if persist and self.store is not None:
            self.store.add_event(kind, worker_id, round_, detail)

    def reject(self, reason: str, detail: str, worker_id: str = "", round_: int | None = None) -> None:
        """A request was refused; `reason` is one of metrics.REJECT_REASONS."""
        self.rejected += 1
        self.metrics.rejected.labels(reason).inc()
        last = self.events[-1] if self.events else None
        if last is not None and (last.kind, last.worker_id, last.detail) == ("reject", worker_id, detail):
            last.count += 1
            last.at = time.time()
            return
        self.events.append(Event(time.time(), "reject", worker_id, round_, detail))

    def excluded(self, reason: str, worker_id: str, round_: int, detail: str) -> None:
        """A worker's pseudo-gradient was left out of a round (or the worker evicted by spot checks);
        `reason` is one of metrics.EXCLUDE_REASONS. Kept as an "exclude" event."""
        self.metrics.excluded.labels(reason).inc()
        self.event("exclude", worker_id, round_, f"{reason}: {detail}")

    def spot_check(self, worker_id: str, round_: int, passed: bool, detail: str) -> None:
        self.metrics.spot_checks.labels("pass" if passed else "fail").inc()
        if not passed:  # passes are only counted: one event per worker per checked round would flood
            self.event("spot_check_failed", worker_id, round_, detail)

    def recent_events(self, limit: int) -> list[Event]:
        return list(self.events)[-limit:] if limit > 0 else []

    # ---- per-worker round timings ----------------------------------------------------------------

    def report(self, worker_id: str, round_: int, tokens: int, compute_seconds: float) -> None:
        self.timings.setdefault(round_, {})[worker_id] = WorkerTiming(tokens, compute_seconds)
        self._unsaved.add(round_)
        for old in [r for r in self.timings if r <= round_ - self.timing_rounds_kept]:
            del self.timings[old]

    def commit(self, worker_id: str, round_: int, averaging_seconds: float) -> None:
        timing = self.timings.get(round_, {}).get(worker_id)
        if timing is not None:
            timing.averaging_seconds = averaging_seconds
            self._unsaved.add(round_)

    def flush(self) -> None:
        """Write the timings that changed; the core calls this inside a round's transaction, so
        they cost no fsync of their own (a restart loses at most the last round's averaging times)."""
        if self.store is None or not self._unsaved:
            return
        rows = [
            (round_, worker_id, t.tokens, t.compute_seconds, t.averaging_seconds)
            for round_ in sorted(self._unsaved)
            for worker_id, t in self.timings.get(round_, {}).items()
        ]
        self.store.save_round_workers(rows)
        self._unsaved.clear()

    # ---- rounds and checkpoints ------------------------------------------------------------------

    def round_closed(
        self, entry: Any, reports: Mapping[str, Any], result: AllReduceResult, seconds: float
    ) -> None:
        """A round's outer step is applied (`entry` is its RoundLog, `reports` the group's reports)."""
        m = self.metrics
        m.tokens.inc(entry.tokens)
        m.outer_step_seconds.observe(seconds)
        m.bytes_sent.labels("data").inc(result.bytes_sent)
        m.bytes_received.labels("data").inc(result.bytes_received)
        for worker_id, report in reports.items():
            self.worker_tokens[worker_id] = self.worker_tokens.get(worker_id, 0) + report.tokens

    def utilisation(self, round_: int, round_seconds: float) -> float:
        """Share of the round's wall time its workers spent in inner steps (NaN when unknown)."""
        timings = self.timings.get(round_)
        if not timings or round_seconds <= 0:
            return math.nan
        mean = sum(t.compute_seconds for t in timings.values()) / len(timings)
        return min(1.0, mean / round_seconds)

    def history_totals(self, history: list[Any]) -> tuple[int, int, bool]:
        """Tokens, data-plane bytes and consistency over the whole round log (`RoundLog`s), in time
        independent of its length: settled entries are added up once."""
        settle = max(0, len(history) - _SETTLED_ROUNDS)
        done, tokens, data_bytes, consistent = self._settled
        if settle < done:  # the log was cut (restart): count again
            done, tokens, data_bytes, consistent = 0, 0, 0, True
        for h in history[done:settle]:
            tokens, data_bytes, consistent = (
                tokens + h.tokens,
                data_bytes + h.data_plane_bytes,
                consistent and h.consistent,
            )
        self._settled = (settle, tokens, data_bytes, consistent)
        for h in history[settle:]:
            tokens, data_bytes, consistent = (
                tokens + h.tokens,
                data_bytes + h.data_plane_bytes,
                consistent and h.consistent,
            )
        return tokens, data_bytes, consistent

    def control_bytes(self, sent: int, received: int) -> None:
        self.metrics.bytes_sent.labels("control").inc(sent)
        self.metrics.bytes_received.labels("control").inc(received)

    def state_bytes(self, sent: int) -> None:
        self.metrics.bytes_sent.labels("state").inc(sent)

    def checkpointed(self, at: float) -> None:
        self.last_checkpoint_at = at

    def checkpoint_age(self) -> float:
        return time.time() - self.last_checkpoint_at

    # ---- restart ---------------------------------------------------------------------------------

    def restore(self, current_round: int) -> None:
        """After a restart: the newest events and the timings of the newest rounds, from the store."""
        if self.store is None:
            return
        for at, kind, worker_id, round_, detail in self.store.recent_events(self.events.maxlen or 0):
            self.events.append(Event(at, kind, worker_id, round_, detail))
        for round_, worker_id, tokens, compute, averaging in self.store.load_round_workers(
            current_round - self.timing_rounds_kept
        ):
            self.timings.setdefault(round_, {})[worker_id] = WorkerTiming(tokens, compute, averaging)
