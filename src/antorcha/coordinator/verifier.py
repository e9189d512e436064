"""Proof of training by spot checks: on a sample of rounds the coordinator checks that each worker's
pseudo-gradient Δ comes from training on the data it was assigned.

The test: the coordinator holds θ_r and the shards it leased to the worker in round r. A worker that
trained on its shard moved θ towards fitting those very batches, so applying its Δ (θ_r − Δ = the
worker's local parameters) lowers the loss on the first batches of its assigned shard by a clear
margin, and not much less than on control batches from shards nobody trained that round. A zero Δ
(a lazy worker) lowers nothing; a random Δ raises the loss on both; a scaled, poisoned Δ raises the
loss. Each fails. A Δ honestly trained on other data lowers both alike and is caught only when it
helps the assigned batches, relatively, less than a quarter as much as the controls (few batches make
the controls' gain noisy; more `verify_batches` sharpen the comparison).

How Δ reaches the coordinator: on a checked round the coordinator reduces the whole vector (every
worker's reduce share is 0 for that round), so its reducer holds every sender's full contribution.
Workers learn that a round is checked only when its group forms, after training. That round costs
the coordinator's link the whole reduction; `verify_fraction` bounds how often.

Pure parts (no I/O): `should_check` (a seeded per-round draw), `measure` (four evaluations of a
model), `judge` (the rule with its reason) and `SpotChecker` (per-worker record: a worker failing
`fail_limit` of its last 2 × `fail_limit` checks is flagged).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from antorcha.data import evaluate
from antorcha.diloco.params import ParamLayout

# Applying an honest Δ lowers the loss on its own batches by several percent after a few inner steps
# (measured on nano, 8 steps, 20 rounds: 1.3 % at the least, usually 5-30 %); a zero Δ changes
# nothing and a random Δ of the same norm moved it by -1.2 % .. +1.3 % (1 draw in 20 above 1 %).
# The margin is thin late in a run, when honest gains shrink: a tuning knob, not a law.
MIN_RELATIVE_GAIN = 0.01  # the assigned batches' loss must fall by at least 1 %
# ... and, in relative terms, by at least a quarter as much as the control batches' loss falls.
# Relative, because control batches often start at a higher loss and fall more in absolute terms;
# a quarter, because with a couple of control batches their gain is noisy (measured on a real cluster:
# an honest Δ lowered its own batches 5.4 % and two control batches 10.4 %).
MIN_SHARE_OF_CONTROL_GAIN = 0.25


@dataclass(frozen=True)
class SpotCheckLosses:
    assigned_before: float  # loss of θ_r on the worker's assigned batches
    assigned_after: float  # loss of θ_r − Δ on them
    control_before: float  # the same on control batches nobody trained this round
    control_after: float

    @property
    def assigned_gain(self) -> float:
        return self.assigned_before - self.assigned_after

    @property
    def control_gain(self) -> float:
        return self.control_before - self.control_after


def should_check(seed: int, round_: int, fraction: float) -> bool:
    """Whether `round_` is spot-checked: a seeded draw, the same after a coordinator restart. A worker
    learns it only when the round's group forms (the coordinator then reduces the whole vector),
    after its training is done."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.sha256(f"spot-check:{seed}:{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def measure(
    model: nn.Module,
    layout: ParamLayout,
    theta: torch.Tensor,
    delta: torch.Tensor,
    assigned: Sequence[torch.Tensor],
    control: Sequence[torch.Tensor],
) -> SpotCheckLosses:
    """Loss of θ and of θ − Δ on the assigned and the control batches (`model` is scratch space)."""
    layout.load_into(model, theta)
    assigned_before, control_before = evaluate(model, list(assigned)), evaluate(model, list(control))
    layout.load_into(model, torch.sub(theta, delta))
    assigned_after, control_after = evaluate(model, list(assigned)), evaluate(model, list(control))
    return SpotCheckLosses(assigned_before, assigned_after, control_before, control_after)


def judge(losses: SpotCheckLosses) -> tuple[bool, str]:
    """Pass when Δ lowers the assigned batches' loss clearly, and not much less than the controls'."""
    scale = max(abs(losses.assigned_before), 1e-6)
    gain = losses.assigned_gain
    facts = (
        f"loss on assigned batches {losses.assigned_before:.4f} -> {losses.assigned_after:.4f}, "
        f"on control batches {losses.control_before:.4f} -> {losses.control_after:.4f}"
    )
    if not gain > MIN_RELATIVE_GAIN * scale:
        return False, f"Δ does not lower the loss on its assigned data ({facts})"
    control_scale = max(abs(losses.control_before), 1e-6)
    if not gain / scale >= MIN_SHARE_OF_CONTROL_GAIN * losses.control_gain / control_scale:
        return False, f"Δ helps its assigned data much less than other data ({facts})"
    return True, f"ok ({facts})"


@dataclass
class SpotChecker:
    """Each worker's recent spot-check results; flags a worker failing `fail_limit` of its last
    2 × `fail_limit` checks (so a worker alternating lazy and honest rounds is caught too)."""

    fail_limit: int
    history: dict[str, deque[bool]] = field(default_factory=dict)
    flagged: dict[str, str] = field(default_factory=dict)

    def record(self, worker_id: str, passed: bool, reason: str) -> str:
        """Add one result; returns the flag's reason when this result flags the worker, else ""."""
        results = self.history.setdefault(worker_id, deque(maxlen=2 * self.fail_limit))
        results.append(passed)
        failures = sum(1 for r in results if not r)
        if worker_id in self.flagged or failures < self.fail_limit:
            return ""
        self.flagged[worker_id] = f"failed {failures} of its last {len(results)} spot checks; last: {reason}"
        return self.flagged[worker_id]
