"""Poisoning: 1 of 5 workers sends −10× its pseudo-gradient every round. Final eval loss with robust
aggregation (centered clipping, and trimmed mean) and with the plain mean, each as a ratio to the
honest-only run (the 4 honest workers on the same data, the attacker absent) measured in the same run.

    python bench/poisoning.py              # ~2 CPU-minutes (4 minutes on a busy 2-core machine)
    python bench/poisoning.py --rounds 8   # quicker

In-process simulation (`antorcha.experiments.simulate`), not real processes: five workers' inner
steps run one after another with the same model, inner trainer, codecs, span layout and the
reducer's own aggregation code (`antorcha.averaging.robust`) as the data plane; real processes on
2 cores would take ~10× longer for the same figures. `tests/security/test_poisoning.py` also checks
on real processes that robust aggregation is active end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from antorcha.config import RunSpec
from antorcha.experiments.simulate import simulate

WORKERS = 5
ATTACKER = 4
FACTOR = -10.0


def spec_for(aggregation: str, inner_steps: int, seed: int) -> RunSpec:
    return RunSpec(
        run_id=f"poisoning-{aggregation}",
        model_size="nano",
        seq_len=64,
        batch_size=8,
        inner_steps=inner_steps,
        round_mode="fixed_steps",
        inner_warmup_steps=5,
        outer_lr=0.7,
        eval_batches=8,
        corpus_max_bytes=2_000_000,
        aggregation=aggregation,  # type: ignore[arg-type]
        seed=seed,
    )


def run_all(rounds: int, inner_steps: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The honest-only baseline, and the attacked run under each aggregation."""
    attack = {ATTACKER: FACTOR}
    cases: dict[str, tuple[str, dict[int, float], frozenset[int]]] = {
        "honest_only": ("mean", {}, frozenset({ATTACKER})),
        "centered_clip": ("centered_clip", attack, frozenset()),
        "trimmed_mean": ("trimmed_mean", attack, frozenset()),
        "plain_mean": ("mean", attack, frozenset()),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, (aggregation, attacks, absent) in cases.items():
        started = time.perf_counter()
        sim = simulate(
            spec_for(aggregation, inner_steps, seed),
            WORKERS,
            rounds,
            eval_every=rounds,
            attacks=attacks,
            absent=absent,
        )
        results[name] = {
            "aggregation": aggregation,
            "final_eval_loss": sim.final_eval_loss,
            "initial_eval_loss": sim.initial_eval_loss,
            "seconds": time.perf_counter() - started,
        }
    honest = results["honest_only"]["final_eval_loss"]
    for r in results.values():
        loss = r["final_eval_loss"]
        r["ratio_to_honest"] = loss / honest if math.isfinite(loss) else math.inf
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run_all(args.rounds, args.inner_steps, args.seed)
    print(
        f"{WORKERS} workers, worker {ATTACKER} sends {FACTOR:g}x its pseudo-gradient every round; nano "
        f"model, H={args.inner_steps}, {args.rounds} rounds; in-process simulation with the reducer's code"
    )
    print(f"{'run':>14} {'aggregation':>14} {'eval loss':>10} {'/ honest':>9} {'seconds':>8}")
    for name, r in results.items():
        print(
            f"{name:>14} {r['aggregation']:>14} {r['final_eval_loss']:>10.4f} "
            f"{r['ratio_to_honest']:>9.3f} {r['seconds']:>8.1f}"
        )
    initial = next(iter(results.values()))["initial_eval_loss"]
    print(f"initial eval loss {initial:.4f}")
    summary = {
        "honest_eval_loss": results["honest_only"]["final_eval_loss"],
        "robust_ratio": results["centered_clip"]["ratio_to_honest"],
        "trimmed_mean_ratio": results["trimmed_mean"]["ratio_to_honest"],
        "plain_mean_ratio": results["plain_mean"]["ratio_to_honest"],
        "initial_eval_loss": initial,
        "details": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
