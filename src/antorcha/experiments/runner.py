"""Running an expanded sweep: each planned run as a local cluster of real processes or as the real DDP
baseline, its rows streamed to ``results.jsonl``, and a done marker per run so a re-run resumes.

Owns the output folder's layout and the resume rule:

    OUT/spec.toml            the spec as given (text), OUT/plan.json the expanded runs
    OUT/results.jsonl        one row per recorded round (DiLoCo) or eval point (DDP) per run
    OUT/runs/<id>/           the run's process logs, configs and worker summaries
    OUT/runs/<id>/done.json  written last, atomically: the run is finished and what it measured

A run counts as done when its ``done.json`` exists and carries the run's current ``config_hash``; a
re-run skips it. Before anything starts, ``results.jsonl`` is rewritten to hold only the rows of done
runs, so a run interrupted half-way leaves no partial rows behind and is redone from the start (its
folder is cleared). A run that fails writes ``failed.json`` instead, and is retried on the next call.

DiLoCo rows come from the coordinator's round records (``GetRunStatus``), which is the one place that
sees every round: tokens trained, train and eval loss, data-plane bytes (each byte counted once, by its
sender), seconds. ``elapsed_s`` is measured here, from when the first worker was started to when the
round's evaluated record was first seen (polled every 0.25 s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from antorcha.experiments.spec import ExperimentSpec, PlannedRun, expand

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
DONE = "done.json"
FAILED = "failed.json"
POLL_S = 0.25


class RunFailedError(RuntimeError):
    """One run of a sweep did not finish; the message says which and why (with a log tail)."""


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # a reader (or a re-run after a kill) sees the whole file or none


def run_dir(out: Path, run: PlannedRun) -> Path:
    return out / "runs" / run.run_id


def done_record(out: Path, run: PlannedRun) -> dict[str, Any] | None:
    """The run's done marker if it is finished with its current settings, else None."""
    path = run_dir(out, run) / DONE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("config_hash") == run.config_hash else None


def read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / RESULTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        # A kill can cut the last line short; such a line belongs to an unfinished run anyway.
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                rows.append(json.loads(line))
    return rows


def prepare_out(out: Path, spec_text: str, runs: list[PlannedRun]) -> set[str]:
    """Set up OUT for (another) pass over `runs`; returns the ids of runs already done."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    (out / "spec.toml").write_text(spec_text)
    plan = [r.model_dump(mode="json") for r in runs]
    _write_json_atomic(out / "plan.json", {"runs": plan})
    done = {r.run_id for r in runs if done_record(out, r) is not None}
    kept = [row for row in read_rows(out) if row.get("run_id") in done]
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, out / RESULTS)
    return done


@dataclass
class Progress:
    """One progress bar for the whole sweep, on stderr: a rewritten line on a terminal, else log lines."""

    runs: list[PlannedRun]
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    width: int = 28
    started: float = field(default_factory=time.monotonic)
    units_done: float = 0.0
    _last_log: float = 0.0
    _last_line: str = ""

    # Runs of a sweep train the same tokens, so each counts as one unit whatever its number of rounds.
    def finish_run(self, run: PlannedRun) -> None:
        self.units_done += 1

    def show(self, index: int, run: PlannedRun, detail: str, within: float = 0.0) -> None:
        share = min(1.0, (self.units_done + within) / max(1, len(self.runs)))
        filled = round(share * self.width)
        elapsed = time.monotonic() - self.started
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {share:4.0%} run {index + 1}/{len(self.runs)} "
            f"{run.label}: {detail} · {elapsed / 60:.1f} min"
        )
        if self.stream.isatty():
            print("\r" + line[:160].ljust(160), end="", file=self.stream, flush=True)
        # In a log: a line when the run's detail changes (a new round), at most every 2 s, or every 30 s.
        elif (detail != self._last_line and time.monotonic() - self._last_log >= 2.0) or (
            time.monotonic() - self._last_log >= 30.0
        ):
            self._last_log, self._last_line = time.monotonic(), detail
            print(line, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        print(("\r" if self.stream.isatty() else "") + text.ljust(80), file=self.stream, flush=True)


RowSink = Callable[[dict[str, Any]], None]
OnProgress = Callable[[str, float], None]


def _row_base(run: PlannedRun) -> dict[str, Any]:
    return {"run_id": run.run_id, "kind": run.kind, "label": run.label, "params": run.params}


# ---- one DiLoCo run ---------------------------------------------------------------------------------


def _worker_settings(run: PlannedRun, index: int, workdir: Path) -> dict[str, Any]:
    plan = run.workers[index]
    settings: dict[str, Any] = {
        "progress": "log",
        "summary_file": str(workdir / f"{plan.name}.summary.json"),
        "slowdown": plan.slowdown,
        "client_mode": plan.client_mode,
        "connect_timeout_s": run.cluster.start_timeout_s,
    }
    if plan.link:
        settings["emulate_link"] = plan.link
    if plan.crash_round is not None:
        # By plan, not by timer: the worker kills itself in that round's all-reduce (see worker/faults.py).
        fault = {"round": plan.crash_round, "phase": "allreduce", "action": "kill"}
        settings["fault_plan"] = json.dumps([fault])
    return settings


def _utilisation(workdir: Path, run: PlannedRun) -> dict[str, Any]:
    per_worker: dict[str, float] = {}
    sent = 0
    for plan in run.workers:
        path = workdir / f"{plan.name}.summary.json"
        if path.exists():  # a worker killed by plan writes no summary
            summary = json.loads(path.read_text())
            per_worker[plan.name] = float(summary["utilisation"])
            sent += int(summary["data_plane_bytes_sent"])
    mean = sum(per_worker.values()) / len(per_worker) if per_worker else None
    return {"utilisation": mean, "utilisation_per_worker": per_worker, "worker_bytes_sent": sent}


def run_diloco(run: PlannedRun, workdir: Path, sink: RowSink, on_progress: OnProgress) -> dict[str, Any]:
    """Train `run` on a LocalCluster; stream one row per evaluated round; return the run's summary."""
    from antorcha.experiments.cluster import LocalCluster

    coordinator = {"lease_s": run.cluster.lease_s, "http_port": 0}  # no dashboard: nobody looks at it
    cluster = LocalCluster(
        workdir,
        run=run.run.model_dump(),
        coordinator=coordinator,
        worker_threads=run.cluster.worker_threads,
    )
    started_at = time.time()
    try:
        cluster.start_coordinator(timeout_s=run.cluster.start_timeout_s)
        pending = list(range(len(run.workers)))
        left: set[str] = set()
        t0 = time.monotonic()
        deadline = t0 + run.cluster.run_timeout_s
        emitted = 0
        tokens = data_bytes = 0
        while True:
            status = cluster.status()
            # Joins and graceful leaves follow the round the coordinator is in (crashes are fault plans).
            for i in [i for i in pending if run.workers[i].join_round <= status.round]:
                cluster.start_worker(run.workers[i].name, _worker_settings(run, i, workdir))
                pending.remove(i)
            for plan in run.workers:
                leaving = plan.leave_round is not None and plan.leave_round <= status.round
                if leaving and plan.name not in left and plan.name in cluster.workers:
                    cluster.kill(cluster.workers[plan.name], signal.SIGTERM)
                    left.add(plan.name)
            evaluated = [r for r in status.rounds if math.isfinite(r.eval_loss)]
            for r in evaluated[emitted:]:
                tokens += r.tokens
                data_bytes += r.data_plane_bytes
                sink(
                    {
                        **_row_base(run),
                        "round": int(r.round),
                        "workers": int(r.workers),
                        "round_tokens": int(r.tokens),
                        "tokens": tokens,
                        "train_loss": _finite(r.train_loss),
                        "eval_loss": _finite(r.eval_loss),
                        "round_bytes": int(r.data_plane_bytes),
                        "bytes": data_bytes,
                        "bytes_per_token": data_bytes / tokens if tokens else None,
                        "round_seconds": float(r.seconds),
                        "elapsed_s": time.monotonic() - t0,
                        "replicas_consistent": bool(r.replicas_consistent),
                    }
                )
            emitted = len(evaluated)
            loss = f"eval {evaluated[-1].eval_loss:.3f}" if evaluated else status.phase
            on_progress(f"round {emitted}/{run.rounds} {loss}", emitted / max(1, run.rounds))
            if status.phase == "finished" and emitted == len(status.rounds):
                break
            expected_dead = {p.name for p in run.workers if p.crash_round is not None} | left
            for name, proc in cluster.workers.items():
                if proc.poll() not in (None, 0) and name not in expected_dead:
                    raise RunFailedError(
                        f"{run.run_id}: worker {name} exited with {proc.returncode}:\n{cluster.tail(name)}"
                    )
            all_exited = all(p.poll() is not None for p in cluster.workers.values())
            if not pending and cluster.workers and all_exited:
                raise RunFailedError(f"{run.run_id}: every worker has exited but the run is not finished")
            if time.monotonic() > deadline:
                raise RunFailedError(f"{run.run_id}: not finished after {run.cluster.run_timeout_s:.0f}s")
            time.sleep(POLL_S)
        wall = time.monotonic() - t0
        cluster.wait_workers(60)
        final = cluster.status()
    finally:
        cluster.stop()
    rounds = list(final.rounds)
    return {
        "initial_eval_loss": _finite(final.initial_eval_loss),
        "final_eval_loss": _finite(rounds[-1].eval_loss) if rounds else None,
        "rounds_recorded": len(rounds),
        "tokens": tokens,
        "bytes": data_bytes,
        "bytes_per_token": data_bytes / tokens if tokens else None,
        "wall_s": wall,
        "started_at": started_at,
        "replicas_consistent": bool(final.replicas_consistent),
        "control_plane_bytes": int(final.control_plane_bytes),
        "state_bytes": int(final.state_bytes),
        "joins": int(final.joins),
        "leaves": int(final.leaves),
        "crashes": int(final.crashes),
        "resyncs": int(final.resyncs),
        "link_method": "application pacer (worker.emulate_link)" if any(w.link for w in run.workers) else "",
        **_utilisation(workdir, run),
    }


# ---- the data-parallel baseline ------------------------------------------------------------------------


def run_ddp(run: PlannedRun, workdir: Path, sink: RowSink, on_progress: OnProgress) -> dict[str, Any]:
    """Train `run` with real gloo DDP over as many ranks as the DiLoCo runs have workers, equal tokens."""
    from antorcha.experiments.baseline import ring_bytes_sent, run_data_parallel

    workers, steps = len(run.workers), run.steps_per_worker
    eval_every = max(1, steps // max(1, run.baseline_evals))
    on_progress(f"{workers} gloo ranks x {steps} steps", 0.0)
    started_at = time.time()
    t0 = time.monotonic()
    result = run_data_parallel(
        run.run,
        workers,
        steps,
        eval_every=eval_every,
        threads_per_worker=run.cluster.worker_threads,
        timeout_s=run.cluster.run_timeout_s,
    )
    wall = time.monotonic() - t0
    (workdir / "ddp.json").write_text(json.dumps(result.to_dict(), indent=2))
    # Every rank sends the ring share of each step's gradient payload: bytes in all = workers x that.
    sent_per_step = workers * ring_bytes_sent(result.payload_bytes_per_step, workers)
    startup = max(0.0, wall - result.seconds - result.eval_seconds)
    previous_tokens = 0
    evals = [e for e in result.evals if e[0] > 0]
    for index, (step, tokens, loss) in enumerate(evals):
        sink(
            {
                **_row_base(run),
                "round": index,
                "step": int(step),
                "workers": workers,
                "round_tokens": int(tokens - previous_tokens),
                "tokens": int(tokens),
                "train_loss": None,
                "eval_loss": _finite(loss),
                "round_bytes": sent_per_step * (step - (evals[index - 1][0] if index else 0)),
                "bytes": sent_per_step * step,
                "bytes_per_token": sent_per_step * step / tokens,
                "round_seconds": None,
                # Ranks report evals only at the end; their time is placed along rank 0's training time.
                "elapsed_s": startup + result.seconds * step / steps,
                "replicas_consistent": len(set(result.rank_checksums)) == 1,
            }
        )
        previous_tokens = tokens
    on_progress(f"eval {result.final_eval_loss:.3f}", 1.0)
    return {
        "initial_eval_loss": result.initial_eval_loss,
        "final_eval_loss": result.final_eval_loss,
        "rounds_recorded": len(evals),
        "tokens": result.tokens,
        "bytes": sent_per_step * steps,
        "bytes_per_token": sent_per_step * steps / result.tokens,
        "wall_s": wall,
        "started_at": started_at,
        "replicas_consistent": len(set(result.rank_checksums)) == 1,
        "method": result.method,
        "num_parameters": result.num_parameters,
        "utilisation": result.seconds / wall if wall > 0 else None,
    }


# ---- the sweep --------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    runs: list[PlannedRun]
    skipped: list[str]
    finished: list[str]
    failed: dict[str, str]
    seconds: float


def run_sweep(
    spec: ExperimentSpec,
    spec_text: str,
    out: Path,
    only: list[str] | None = None,
    stream: TextIO | None = None,
) -> SweepOutcome:
    """Run every planned run of `spec` that is not done yet, in order; KeyboardInterrupt stops cleanly
    (the run in flight has its processes stopped and is redone next time)."""
    runs = expand(spec)
    if only:
        unknown = set(only) - {r.run_id for r in runs}
        if unknown:
            raise ValueError(f"unknown run ids {sorted(unknown)}; known: {[r.run_id for r in runs]}")
        runs = [r for r in runs if r.run_id in only]
    done = prepare_out(out, spec_text, runs)
    progress = Progress(runs, stream or sys.stderr)
    started = time.monotonic()
    skipped, finished, failed = [], [], {}
    with open(out / RESULTS, "a") as results:

        def sink(row: dict[str, Any]) -> None:
            results.write(json.dumps(row) + "\n")
            results.flush()

        for index, run in enumerate(runs):
            workdir = run_dir(out, run)
            if run.run_id in done:
                progress.say(f"skip {run.run_id}: done ({workdir / DONE})")
                log.info("skipping finished run run=%s", run.run_id)
                skipped.append(run.run_id)
                progress.finish_run(run)
                continue
            if workdir.exists():  # left by an interrupted or failed attempt: start clean
                shutil.rmtree(workdir)
            workdir.mkdir(parents=True)
            progress.say(f"run {run.run_id} ({run.label}): {run.kind}, {run.tokens:,} tokens")
            execute = run_ddp if run.kind == "ddp" else run_diloco
            try:
                summary = execute(run, workdir, sink, lambda d, w, i=index, r=run: progress.show(i, r, d, w))
            except (RunFailedError, RuntimeError, TimeoutError, OSError) as e:
                log.error("run failed run=%s: %s", run.run_id, e)
                failure = {"run_id": run.run_id, "error": str(e), "at": time.time()}
                _write_json_atomic(workdir / FAILED, failure)
                progress.say(f"FAILED {run.run_id}: {str(e).splitlines()[0]}")
                failed[run.run_id] = str(e)
                progress.finish_run(run)
                continue
            record = {
                **_row_base(run),
                "config_hash": run.config_hash,
                "baseline_id": run.baseline_id,
                "planned_tokens": run.tokens,
                "finished_at": time.time(),
                **summary,
            }
            _write_json_atomic(workdir / DONE, record)  # last: only now is the run done
            finished.append(run.run_id)
            progress.finish_run(run)
            progress.say(
                f"done {run.run_id}: eval loss {summary['final_eval_loss']:.4f}, "
                f"{summary['bytes_per_token']:.3g} bytes/token, {summary['wall_s']:.0f}s"
            )
    return SweepOutcome(runs, skipped, finished, failed, time.monotonic() - started)
