"""Unequal hardware: two workers, one throttled to 1/3 speed, trained with token-budget rounds and
with classic lock-step fixed-H rounds. Reports tokens per second of the whole run (the budget mode
should approach the pair's summed speed: 2x the fixed-H mode, where the fast worker idles 2/3 of
every round) and eval loss at equal wall time.

    python bench/heterogeneity.py            # about 6 minutes on 2 CPU cores
    python bench/heterogeneity.py --rounds 4 # quicker

The slow worker's steps are stretched by sleeping twice each step's own compute time (`slowdown=3`),
so on a CPU machine it does not slow the fast worker down by competing for cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from antorcha.experiments.cluster import LocalCluster

SLOWDOWN = 3.0


def _run(workdir: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    run = {
        "run_id": mode,
        "model_size": "nano",
        "seq_len": 64,
        "batch_size": 8,
        "inner_steps": args.inner_steps,
        "round_mode": mode,
        "max_rounds": args.rounds,
        "min_workers": 2,
        "inner_warmup_steps": 10,
        "eval_batches": 8,
        "codec": "int8",
        "round_deadline_s": 900.0,
    }
    started = time.monotonic()
    with LocalCluster(workdir, run=run, coordinator={"lease_s": 30.0}) as cluster:
        cluster.start_coordinator()
        for name, slowdown in (("fast", 1.0), ("slow", SLOWDOWN)):
            summary = str(workdir / f"{name}.summary.json")
            cluster.start_worker(name, {"slowdown": slowdown, "summary_file": summary})
        status = cluster.wait_for(
            lambda s: s.phase == "finished" and all(math.isfinite(r.eval_loss) for r in s.rounds),
            timeout_s=3600,
            poll_s=1.0,
        )
        cluster.wait_workers(120)
    summaries = {n: json.loads((workdir / f"{n}.summary.json").read_text()) for n in ("fast", "slow")}
    elapsed, curve = 0.0, []
    for r in status.rounds:
        elapsed += r.seconds
        curve.append((elapsed, r.tokens, r.eval_loss))
    tokens = sum(r.tokens for r in status.rounds)
    return {
        "mode": mode,
        "tokens": tokens,
        "train_seconds": elapsed,
        "tokens_per_second": tokens / elapsed,
        "curve": curve,  # (seconds since round 0 opened, round tokens, eval loss after the round)
        "tokens_by_worker": {n: s["tokens"] for n, s in summaries.items()},
        "utilisation_by_worker": {n: s["utilisation"] for n, s in summaries.items()},
        "replicas_consistent": status.replicas_consistent,
        "initial_eval_loss": status.initial_eval_loss,
        "seconds": time.monotonic() - started,
    }


def loss_at(curve: list[tuple[float, int, float]], seconds: float, initial: float) -> float:
    """Eval loss of the last round finished by `seconds` (the initial loss if none)."""
    done = [loss for t, _, loss in curve if t <= seconds + 1e-9]
    return done[-1] if done else initial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inner-steps", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="antorcha-bench-het-"))
    results = {}
    for mode in ("fixed_steps", "token_budget"):
        print(f"{mode} ...", file=sys.stderr, flush=True)
        results[mode] = _run(workdir / mode, mode, args)
    fixed, budget = results["fixed_steps"], results["token_budget"]
    horizon = min(fixed["train_seconds"], budget["train_seconds"])
    loss_fixed = loss_at(fixed["curve"], horizon, fixed["initial_eval_loss"])
    loss_budget = loss_at(budget["curve"], horizon, budget["initial_eval_loss"])
    speedup = budget["tokens_per_second"] / fixed["tokens_per_second"]

    print()
    print(
        f"2 workers, speeds 1 and 1/{SLOWDOWN:g}; nano model, H={args.inner_steps} (per worker on "
        f"average in token-budget rounds), {args.rounds} rounds each, int8 averaging"
    )
    print(f"{'mode':>13} {'tokens/s':>9} {'fast tok':>9} {'slow tok':>9} {'util fast':>9} {'eval@T':>8}")
    for mode, r in results.items():
        at_t = loss_fixed if mode == "fixed_steps" else loss_budget
        print(
            f"{mode:>13} {r['tokens_per_second']:>9.0f} {r['tokens_by_worker']['fast']:>9} "
            f"{r['tokens_by_worker']['slow']:>9} {r['utilisation_by_worker']['fast']:>9.2f} {at_t:>8.4f}"
        )
    print(
        f"token-budget / fixed-H tokens per second: {speedup:.2f}x (ideal 2.0x); "
        f"equal wall time T = {horizon:.1f}s"
    )
    print(
        json.dumps(
            {
                "speedup": speedup,
                "loss_budget": loss_budget,
                "loss_fixed_h": loss_fixed,
                "equal_wall_seconds": horizon,
                "details": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
