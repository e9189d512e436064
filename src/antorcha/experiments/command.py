"""The `antorcha experiment` command: `run SPEC [--out DIR]`, `plan SPEC` and `report DIR`.

Owns the argparse sub-parser (``add_experiment_parser``) and its handlers. `run` expands the spec,
runs what is not done yet (resumable: see ``antorcha.experiments.runner``), then writes the report.
SIGTERM is turned into KeyboardInterrupt so that an interrupted sweep stops its processes (the
cluster's and DDP ranks') on the way out, exactly as Ctrl-C does; it exits 130.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run(args: argparse.Namespace) -> int:
    from antorcha.experiments.report import write_report
    from antorcha.experiments.runner import run_sweep
    from antorcha.experiments.spec import load_spec

    spec, text = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("experiment-results") / spec.name
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        outcome = run_sweep(spec, text, out, only=args.only or None)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; finished runs are kept in {out}, run the same command to resume", file=sys.stderr
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = write_report(out)
    print(
        f"{len(outcome.finished)} run(s) done, {len(outcome.skipped)} skipped (already done), "
        f"{len(outcome.failed)} failed in {outcome.seconds:.0f}s; report: {report}"
    )
    for run_id, error in outcome.failed.items():
        print(f"failed {run_id}: {error.splitlines()[0]}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _plan(args: argparse.Namespace) -> int:
    from antorcha.experiments.spec import expand, load_spec

    spec, _ = load_spec(args.spec)
    print(f"{'run id':<36} {'kind':<6} {'label':<24} {'workers':>7} {'rounds':>6} {'tokens':>12}")
    for run in expand(spec):
        print(
            f"{run.run_id:<36} {run.kind:<6} {run.label[:24]:<24} {len(run.workers):>7} {run.rounds:>6} "
            f"{run.tokens:>12,}"
        )
    return 0


def _report(args: argparse.Namespace) -> int:
    from antorcha.experiments.report import write_report

    print(write_report(Path(args.dir)))
    return 0


def add_experiment_parser(subparsers: Any) -> None:
    """Register `experiment` (with run, plan, report) on the `antorcha` command's subparsers."""
    p = subparsers.add_parser("experiment", help="run a sweep of local clusters from a spec, with a report")
    sub = p.add_subparsers(dest="experiment_command", required=True)

    r = sub.add_parser("run", help="run every run of SPEC not done yet, then write the report")
    r.add_argument("spec", help="experiment spec (TOML), e.g. experiments/h_sweep.toml")
    r.add_argument("--out", help="output folder (default: experiment-results/<name>)")
    r.add_argument("--only", action="append", metavar="RUN_ID", help="run only this run id (repeatable)")
    r.set_defaults(fn=_run)

    r = sub.add_parser("plan", help="list the runs SPEC expands into, without running anything")
    r.add_argument("spec")
    r.set_defaults(fn=_plan)

    r = sub.add_parser("report", help="rebuild summary.csv, plots and report.md of an output folder")
    r.add_argument("dir")
    r.set_defaults(fn=_report)
