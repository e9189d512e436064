"""Poisoning: one worker sends −10× its pseudo-gradient every round.

In process (the reducer's own aggregation code over the data plane's span layout, see
`experiments.simulate`): with centered clipping the final eval loss is within 5 % of the honest-only
run (the attacker absent, same data for the others); with the plain mean it is worse than robust.
On real processes: robust aggregation is active end to end (replicas agree, the model still learns).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _hostile import SMALL_RUN, run_cluster

from antorcha.averaging.robust import AggregationPolicy, aggregate, norm_outliers
from antorcha.config import RunSpec
from antorcha.experiments.simulate import simulate


def test_robust_rules_bound_one_senders_pull() -> None:
    honest = [torch.full((8,), 1.0), torch.full((8,), 1.2), torch.full((8,), 0.8), torch.full((8,), 1.1)]
    attacker = torch.full((8,), -10.0)
    weights = [1.0] * 5
    for method in ("centered_clip", "trimmed_mean"):
        out = aggregate(AggregationPolicy(method), [*honest, attacker], weights)
        assert float(out.min()) > 0.5, method  # the plain mean would be -1.22
    mean = aggregate(AggregationPolicy("mean"), [*honest, attacker], weights)
    assert float(mean.max()) < 0
    assert set(norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 11.0}, 4.0)) == {"d"}
    assert norm_outliers({"a": 1.0, "d": 11.0}, 4.0) == {}  # two senders: no majority to trust


def test_robust_aggregation_survives_poisoning_and_the_mean_does_not() -> None:
    torch.set_num_threads(1)

    def spec(aggregation: str) -> RunSpec:
        return RunSpec(
            model_size="nano",
            seq_len=32,
            batch_size=4,
            inner_steps=6,
            round_mode="fixed_steps",
            inner_warmup_steps=2,
            eval_batches=4,
            corpus_max_bytes=1_000_000,
            aggregation=aggregation,  # type: ignore[arg-type]
        )

    rounds, workers, attack = 8, 5, {4: -10.0}
    honest = simulate(spec("mean"), workers, rounds, eval_every=rounds, absent=frozenset({4}))
    robust = simulate(spec("centered_clip"), workers, rounds, eval_every=rounds, attacks=attack)
    plain = simulate(spec("mean"), workers, rounds, eval_every=rounds, attacks=attack)
    assert honest.final_eval_loss < 0.9 * honest.initial_eval_loss  # the baseline learns
    assert robust.final_eval_loss <= 1.05 * honest.final_eval_loss
    assert not plain.final_eval_loss < 1.05 * robust.final_eval_loss  # NaN/inf count as worse


@pytest.mark.slow
def test_robust_aggregation_is_active_end_to_end(tmp_path: Path) -> None:
    run = {
        **SMALL_RUN,
        "run_id": "poison",
        "eval_batches": 4,
        "aggregation": "centered_clip",
    }
    # It declares its scaled norm: a lie would get it left out of the coordinator's span (and resynced)
    # before the aggregation had anything to bound; norm_outlier_k is 0, so only the aggregation acts.
    poison = {"round": 0, "phase": "report", "action": "scale", "factor": -10.0, "repeat": True}
    out = run_cluster(tmp_path, run, ("h1", "h2"), {"attacker": [{**poison, "declared": True}]})
    rounds = out.status.rounds
    assert [r.workers for r in rounds] == [3] * 5  # nothing excluded it: the aggregation bounds it
    assert out.status.replicas_consistent and all(r.replicas_consistent for r in rounds)
    for name in ("h1", "h2", "attacker"):
        out.rounds_agree(name, range(5))
    # With the plain mean, (Δ1 + Δ2 − 10 Δ3) / 3 steps θ backwards every round; clipped, it learns.
    assert all(math.isfinite(r.eval_loss) for r in rounds)
    assert rounds[-1].eval_loss < 0.85 * out.status.initial_eval_loss
