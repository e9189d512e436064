"""What a worker shows and exports about itself: the progress display (round, inner step, tokens/s,
loss, time to the next sync) and its Prometheus metrics (served at `metrics_port` when set). The
daemon calls it at each inner step and at the end of each round; it costs microseconds per step.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import TextIO

from antorcha.averaging.base import AllReduceResult
from antorcha.config import WorkerSettings
from antorcha.dashboard.metrics import WorkerMetrics
from antorcha.worker.progress import ProgressLine, ProgressLog, human

log = logging.getLogger(__name__)

_RATE_SMOOTHING = 0.2  # weight of the newest step in the moving average of tokens/s and step time


class WorkerObserver:
    def __init__(self, settings: WorkerSettings, stream: TextIO | None = None) -> None:
        self.settings = settings
        self.stream = stream or sys.stderr
        self.metrics = WorkerMetrics()
        self.display: ProgressLine | ProgressLog | None = None
        self.tokens_per_second = 0.0
        self.step_seconds = math.nan
        self.metrics_port = 0

    def start(self) -> None:
        """Serve metrics and open the display (after logging is set up: the line shares stderr)."""
        s = self.settings
        if s.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
            except OSError as e:
                raise SystemExit(
                    f"antorcha worker: cannot serve metrics on {s.metrics_host}:{s.metrics_port} "
                    f"({e.strerror or e}); set [worker] metrics_port to a free port, or 0 to turn it off"
                ) from None
            log.info("metrics on http://%s:%d/metrics", s.metrics_host, self.metrics_port)
        mode = s.progress
        if mode == "auto":
            mode = "line" if self.stream.isatty() else "log"
        if mode == "line":
            self.display = ProgressLine(self.stream)
        elif mode == "log":
            self.display = ProgressLog(s.progress_interval_s)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
        self.metrics.close()

    # ---- what the daemon reports -----------------------------------------------------------------

    def bytes(self, plane: str, sent: int, received: int) -> None:
        """Bytes of one exchange on `plane` (data, control or state)."""
        if sent:
            self.metrics.bytes_sent.labels(plane).inc(sent)
        if received:
            self.metrics.bytes_received.labels(plane).inc(received)

    def step(
        self, round_: int, step: int, loss: float, seconds: float, tokens: int, steps_left: int
    ) -> float:
        """An inner step of `round_` is done (`step` steps into the round); returns the smoothed tokens/s."""
        m = self.metrics
        m.round.set(round_)
        m.tokens.inc(tokens)
        m.inner_step_seconds.observe(seconds)
        if math.isfinite(loss):
            m.train_loss.set(loss)
        if seconds > 0:
            rate = tokens / seconds
            first = self.tokens_per_second == 0.0
            self.tokens_per_second = rate if first else _blend(self.tokens_per_second, rate)
            self.step_seconds = (
                seconds if math.isnan(self.step_seconds) else _blend(self.step_seconds, seconds)
            )
        if self.display is not None:
            sync_in = steps_left * self.step_seconds if math.isfinite(self.step_seconds) else math.nan
            self.display.show(self._text(round_, step, loss, sync_in))
        return self.tokens_per_second

    def waiting(self, round_: int, reason: str) -> None:
        if isinstance(self.display, ProgressLine):
            self.display.show(f"round {round_} · waiting: {reason}")
        elif self.display is not None:
            self.display.show(f"round={round_} waiting reason={reason!r}")

    def round_done(
        self, round_: int, result: AllReduceResult, outer_seconds: float, utilisation: float
    ) -> None:
        m = self.metrics
        m.outer_step_seconds.observe(outer_seconds)
        m.compute_utilisation.set(utilisation)
        self.bytes("data", result.bytes_sent, result.bytes_received)

    def _text(self, round_: int, step: int, loss: float, sync_in: float) -> str:
        sync = f"~{sync_in:.0f}s" if math.isfinite(sync_in) else "?"
        if isinstance(self.display, ProgressLine):
            return (
                f"round {round_} · step {step} · {human(self.tokens_per_second)} tok/s · "
                f"loss {loss:.3f} · sync in {sync}"
            )
        return (
            f"round={round_} step={step} tokens_per_s={self.tokens_per_second:.0f} loss={loss:.4f} "
            f"sync_in_s={sync_in:.0f}"
        )


def _blend(old: float, new: float) -> float:
    return (1 - _RATE_SMOOTHING) * old + _RATE_SMOOTHING * new
