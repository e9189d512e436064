"""Robust aggregation of the contributions one reducer holds for one chunk of its span. Pure: tensors
in, a tensor (or a decision with a reason) out; no clocks, no I/O.

A reducer only ever sees its own span, so every rule here works on the senders' values of one chunk:

- `norm_outliers`: a sender whose chunk norm is more than k × the median of the senders' norms is
  left out (with a reason). The median of a group is set by its honest majority, so one sender cannot
  move the bar; with fewer than `MIN_SENDERS_FOR_NORM_RULE` senders there is no majority to trust
  and nobody is left out.
- `centered_clip` (Karimireddy et al., 2021, "Learning from History for Byzantine Robust
  Optimization"): start from the coordinate-wise median of the senders (robust, and it needs no state:
  the reducer of a span changes from round to round, so "the previous round's average" is not at
  hand), clip each sender's deviation from the centre to radius τ = the median of the deviations'
  norms, and move the centre by the weighted mean of the clipped deviations; repeat. One sender's
  pull on the result is at most its weight share × τ, however large what it sent.
- `trimmed_mean`: per coordinate, drop the `trim` share of the lowest and of the highest values and
  take the token-weighted mean of the rest.

Whatever the rule, the reducer finalizes each chunk once and sends every member the same bytes, so
robust aggregation never costs replica consistency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["mean", "centered_clip", "trimmed_mean"]
AGGREGATIONS: tuple[str, ...] = ("mean", "centered_clip", "trimmed_mean")
MIN_SENDERS_FOR_NORM_RULE = 3
# A span's norm may exceed the sender's declared total norm by codec rounding only (int4 moves a value
# by at most half a level, ~4 % of a block's absmax): allow that much, relatively and absolutely.
DECLARED_NORM_TOLERANCE = 0.1


@dataclass(frozen=True)
class AggregationPolicy:
    """How a reducer turns the senders' values of a chunk into the one value every member gets."""

    method: str = "mean"
    norm_outlier_k: float = 0.0  # leave out a sender whose chunk norm > k × the median; 0 = off
    clip_iterations: int = 3
    trim: float = 0.2  # trimmed_mean: share of senders dropped at each end, per coordinate

    def __post_init__(self) -> None:
        if self.method not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.method!r}; known: {', '.join(AGGREGATIONS)}")

    @property
    def keeps_senders_apart(self) -> bool:
        """A plain mean can sum values as they arrive; every other rule needs each sender's values."""
        return self.method != "mean" or self.norm_outlier_k > 0


def norm_outliers(norms: Mapping[str, float], k: float) -> dict[str, str]:
    """Senders whose norm is above k × the median norm, each with the reason (empty when k is 0 or
    there are too few senders to have a majority)."""
    if k <= 0 or len(norms) < MIN_SENDERS_FOR_NORM_RULE:
        return {}
    median = _median_of(list(norms.values()))
    if median <= 0 or not math.isfinite(median):
        return {}
    return {
        sender: f"pseudo-gradient norm {norm:.4g} is {norm / median:.1f}x the median {median:.4g} (k={k:g})"
        for sender, norm in norms.items()
        if norm > k * median
    }


def exceeds_declared(measured_span_norm: float, declared_norm: float) -> bool:
    """A span of Δ measured larger than the sender's declared ‖Δ‖ (beyond codec rounding): a part of
    a vector is never larger than the whole, so the sender lied about its norm."""
    if not declared_norm > 0:  # not declared: nothing to compare with
        return False
    return measured_span_norm > declared_norm * (1 + DECLARED_NORM_TOLERANCE) + 1e-6


def _median_of(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over senders (dim 0); the mean of the two middle values for an even count, so that two
    senders are treated alike (torch.median would take the lower one)."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2].clone()
    return torch.mul(torch.add(ordered[n // 2 - 1], ordered[n // 2]), 0.5)


def weighted_mean(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = torch.zeros_like(values[0])
    for v, w in zip(values, weights, strict=True):
        total.add_(torch.mul(v, w))
    return torch.div(total, sum(weights))


def centered_clip(
    values: Sequence[torch.Tensor], weights: Sequence[float], iterations: int = 3
) -> torch.Tensor:
    stacked = torch.stack(list(values))
    center = coordinate_median(stacked)
    deviations = stacked - center
    radius = float(torch.linalg.vector_norm(deviations, dim=1).median())
    if radius <= 0:
        return center
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    w = w / w.sum()
    for _ in range(max(1, iterations)):
        deviations = stacked - center
        norms = torch.linalg.vector_norm(deviations, dim=1).clamp_min(1e-30)
        scale = torch.clamp(radius / norms, max=1.0)
        center = center + (deviations * (scale * w)[:, None]).sum(dim=0)
    return center


def trimmed_mean(values: Sequence[torch.Tensor], weights: Sequence[float], trim: float = 0.2) -> torch.Tensor:
    stacked = torch.stack(list(values))
    n = stacked.shape[0]
    cut = min(math.floor(trim * n), (n - 1) // 2)  # always keep at least one value per coordinate
    if cut == 0:
        return weighted_mean(values, weights)
    ordered, index = stacked.sort(dim=0)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)[index]
    kept, kept_w = ordered[cut : n - cut], w[cut : n - cut]
    return (kept * kept_w).sum(dim=0) / kept_w.sum(dim=0)


def aggregate(
    policy: AggregationPolicy, values: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """The policy's aggregate of one chunk's contributions (at least one, with positive weights)."""
    if not values:
        raise ValueError("nothing to aggregate")
    if policy.method == "mean" or len(values) == 1:
        return weighted_mean(values, weights)
    if policy.method == "centered_clip":
        return centered_clip(values, weights, policy.clip_iterations)
    return trimmed_mean(values, weights, policy.trim)
