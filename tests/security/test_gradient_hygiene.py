"""Pseudo-gradient hygiene on real processes: a hostile worker sends NaN, a wrong-shaped contribution,
and a −10×-scaled Δ (once declaring its norm, once lying about it), in different rounds of one run.
Each time the two honest workers' next round completes with θ checksums equal to the coordinator's,
and the run goes on.

Plan of the hostile worker "bad" (fixed-H rounds 0..6, norm_outlier_k = 4):
  r1 NaN in Δ, real norm declared → every reducer refuses the chunk (REDUCE_REJECTED), no replica moves
  r2 every chunk one element short  → refused on the data plane (REDUCE_REJECTED)
  r3 Δ × −10, norm declared         → left out when the group forms (norm outlier: event + metric)
  r4 Δ × −10, real norm declared    → the coordinator's span measures more than declared, every reducer's
                                      k × median rule leaves it out (event + metric)
  r5 NaN in Δ and in the declared norm → ReportRound refused with INVALID_ARGUMENT; it sits the round out
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
from _hostile import Outcome, run_cluster

pytestmark = pytest.mark.slow

ROUNDS = 7
RUN = {
    "run_id": "hygiene",
    "model_size": "nano",
    "seq_len": 32,
    "batch_size": 4,
    "inner_steps": 6,
    "round_mode": "fixed_steps",
    "inner_warmup_steps": 2,
    "min_workers": 3,
    "max_rounds": ROUNDS,
    "round_deadline_s": 120.0,
    "allreduce_timeout_s": 10.0,
    "eval_batches": 2,
    "norm_outlier_k": 4.0,
}
PLAN = [
    {"round": 1, "phase": "report", "action": "nan"},
    {"round": 2, "phase": "report", "action": "shape"},
    {"round": 3, "phase": "report", "action": "scale", "factor": -10.0, "declared": True},
    {"round": 4, "phase": "report", "action": "scale", "factor": -10.0},
    {"round": 5, "phase": "report", "action": "nan", "declared": True},
]
HONEST = ("h1", "h2")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    yield run_cluster(tmp_path_factory.mktemp("hygiene"), RUN, HONEST, {"bad": PLAN})


def _honest_rounds_agree(outcome: Outcome, rounds: range) -> None:
    """Every honest worker averaged each round and its θ checksum equals the coordinator's."""
    for name in HONEST:
        outcome.rounds_agree(name, rounds)


def _exclusions(outcome: Outcome, round_: int) -> list[str]:
    return [
        str(e["detail"])
        for e in outcome.events
        if e["kind"] == "exclude" and e["round"] == round_ and e["worker_id"] == outcome.ids["bad"]
    ]


def _metric(outcome: Outcome, name: str, label: str) -> float:
    return outcome.metric(name, "reason", label)


def test_the_run_finishes_and_learns(run: Outcome) -> None:
    rounds = run.status.rounds
    assert [r.round for r in rounds] == list(range(ROUNDS))
    assert all(math.isfinite(r.eval_loss) for r in rounds)  # no NaN ever reached θ
    assert rounds[-1].eval_loss < run.status.initial_eval_loss


def test_nan_in_a_pseudo_gradient(run: Outcome) -> None:
    bad = run.logs["bad"]
    # Round 1 (lying about its norm): the reducers refuse the NaN chunk on the data plane.
    assert "REDUCE_REJECTED" in bad and "chunk holds NaN or Inf" in bad
    # Round 5 (declaring a NaN norm): the exact gRPC status code, and it sat the round out.
    assert "report refused: coordinator refused (INVALID_ARGUMENT): pseudo_gradient_norm" in bad
    assert run.status.rounds[5].workers == 2
    assert _metric(run, "antorcha_rejected_requests_total", "invalid_argument") >= 1
    _honest_rounds_agree(run, range(1, 7))  # rounds 1, 5 and the ones after complete for the others


def test_wrong_shape_contribution_on_the_data_plane(run: Outcome) -> None:
    assert re.search(r"REDUCE_REJECTED: chunk 0 has \d+ elements, expected \d+", run.logs["bad"])
    assert run.status.rounds[2].workers == 3  # it was in the group; only its contribution was refused
    assert any(d.startswith("data_plane:") for d in _exclusions(run, 2))
    _honest_rounds_agree(run, range(2, 4))


def test_norm_outlier_pseudo_gradient(run: Outcome) -> None:
    # Declared: left out of round 3's group, with the reason, an event and the metric.
    assert run.status.rounds[3].workers == 2
    assert any(d.startswith("norm_outlier:") and "k=4" in d for d in _exclusions(run, 3))
    assert "left out of round 3: pseudo-gradient norm" in run.logs["bad"]
    # Lied about: caught on the data plane, from what the coordinator's reducer measured.
    assert run.status.rounds[4].workers == 3
    assert any(d.startswith(("norm_mismatch:", "norm_outlier:")) for d in _exclusions(run, 4))
    assert _metric(run, "antorcha_excluded_workers_total", "norm_outlier") >= 1
    _honest_rounds_agree(run, range(3, 6))
