"""Pseudo-gradient hygiene on the coordinator: which workers' pseudo-gradients are too large to
average. Pure: norms in, exclusions with reasons out; no clocks, no I/O.

Two kinds of evidence, because a declared norm is the worker's word:

- **Declared** (`ReportRound.pseudo_gradient_norm`): at the round's group formation the coordinator
  leaves out a worker whose declared ‖Δ‖ is above k × the median of this round's declared norms (or,
  with fewer than three reports, of the recent rounds' accepted norms). This costs nothing and keeps
  an honest-but-broken worker (a diverged run, a bad learning rate) out before any byte is sent.
- **Measured** (what the coordinator's own reducer received for its span, `ReduceSession`): a span
  of Δ can never be larger than the whole of Δ, so a sender whose span norm exceeds its declared norm
  lied, and is left out of that span; and every reducer (the workers' too) applies the same k × median
  rule per chunk to what it actually received. A liar is caught on the data plane, not by its word.

`NormTracker` keeps each worker's recent norms for the operator and for the small-group fallback.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from antorcha.averaging.robust import MIN_SENDERS_FOR_NORM_RULE, exceeds_declared

__all__ = ["NormTracker", "declared_outliers", "exceeds_declared", "median"]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def declared_outliers(norms: Mapping[str, float], k: float, history: list[float]) -> dict[str, str]:
    """Workers whose declared norm is above k × the reference median, each with a reason.

    The reference is the median of this round's positive norms when there are at least three (an
    honest majority sets it), else the median of recent accepted norms (at least three of them);
    without either, nobody is left out. A norm of 0 means "not reported" and is never an outlier.
    """
    if k <= 0:
        return {}
    current = [n for n in norms.values() if n > 0]
    if len(current) >= MIN_SENDERS_FOR_NORM_RULE:
        reference, where = median(current), "this round's median"
    elif len(history) >= MIN_SENDERS_FOR_NORM_RULE:
        reference, where = median(history), "the recent rounds' median"
    else:
        return {}
    if not reference > 0:
        return {}
    return {
        worker: f"pseudo-gradient norm {norm:.4g} is {norm / reference:.1f}x {where} "
        f"{reference:.4g} (k={k:g})"
        for worker, norm in norms.items()
        if norm > k * reference
    }


@dataclass
class NormTracker:
    """Recent pseudo-gradient norms per worker, and the screening of a round's declared norms."""

    k: float
    keep: int = 16
    declared: dict[str, deque[float]] = field(default_factory=dict)
    accepted: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def record(self, worker_id: str, norm: float) -> None:
        self.declared.setdefault(worker_id, deque(maxlen=self.keep)).append(norm)

    def screen(self, norms: Mapping[str, float]) -> dict[str, str]:
        """This round's outliers; the others' norms join the history the small-group rule falls back on."""
        excluded = declared_outliers(norms, self.k, list(self.accepted))
        self.accepted.extend(n for w, n in norms.items() if w not in excluded and n > 0)
        return excluded

    def last(self, worker_id: str) -> float:
        history = self.declared.get(worker_id)
        return history[-1] if history else math.nan
