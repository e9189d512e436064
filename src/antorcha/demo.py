"""`antorcha demo`: a coordinator and N workers as separate processes on this machine, training a
small model on the offline corpus, with a live table of rounds and a JSON summary at the end."""

from __future__ import annotations

import json
import math
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from antorcha.experiments.cluster import LocalCluster
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb

HEADER = (
    f"{'round':>5} {'workers':>7} {'tokens':>9} {'train loss':>10} {'eval loss':>9} {'bytes avg':>10} "
    f"{'seconds':>7}"
)


def _row(r: pb.RoundRecord) -> str:
    return (
        f"{r.round:>5} {r.workers:>7} {r.tokens:>9} {r.train_loss:>10.4f} {r.eval_loss:>9.4f} "
        f"{_human(r.data_plane_bytes):>10} {r.seconds:>7.1f}"
    )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def demo_run_spec(rounds: int, workers: int) -> dict[str, Any]:
    return {
        "run_id": "demo",
        "model_size": "micro",
        "seq_len": 128,
        "batch_size": 8,
        "inner_steps": 20,
        "inner_lr": 3e-3,
        "inner_warmup_steps": 10,
        "max_rounds": rounds,
        "min_workers": workers,
        "round_deadline_s": 120.0,
        "allreduce_timeout_s": 20.0,
        "eval_batches": 8,
    }


def summarize(status: pb.RunStatus, workers: int) -> dict[str, Any]:
    rounds = list(status.rounds)
    final = rounds[-1].eval_loss if rounds else math.nan
    recorded = {r.round for r in rounds}
    return {
        "rounds": len(rounds),
        "workers": workers,
        "initial_eval_loss": round(status.initial_eval_loss, 5),
        "final_eval_loss": round(final, 5),
        "tokens": status.tokens,
        "data_plane_bytes": status.data_plane_bytes,
        "state_bytes": status.state_bytes,
        "control_plane_bytes": status.control_plane_bytes,
        "replicas_consistent": bool(status.replicas_consistent) and len(rounds) > 0,
        "joins": status.joins,
        "leaves": status.leaves,
        "crashes": status.crashes,
        "resyncs": status.resyncs,
        # Rounds the coordinator moved past without a record: a gap in the round log.
        "rounds_lost": status.round - len(recorded) + len([r for r in recorded if r >= status.round]),
    }


class ChurnSchedule:
    """Joins, a graceful leave and a crash at fixed rounds, so `--churn` shows elasticity live."""

    def __init__(self, cluster: LocalCluster, workers: int) -> None:
        self.cluster, self.workers = cluster, workers
        self.steps: list[tuple[int, str, str]] = [
            (1, "join", f"worker-{workers}"),
            (2, "leave", "worker-0"),
            (3, "join", f"worker-{workers + 1}"),
            (5, "join", f"worker-{workers + 2}"),
        ]

    def crash_plans(self) -> dict[str, str]:
        # worker-1 dies with SIGKILL in the middle of round 3's averaging, by plan (not by timer).
        return {"worker-1": '[{"round": 3, "phase": "allreduce", "action": "kill"}]'}

    def advance(self, round_: int, say: Any) -> None:
        while self.steps and round_ >= self.steps[0][0]:
            _, action, name = self.steps.pop(0)
            if action == "join":
                self.cluster.start_worker(name)
                say(f"  + {name} joins at round {round_}")
            else:
                self.cluster.kill(self.cluster.workers[name], signal.SIGTERM)
                say(f"  - {name} leaves (SIGTERM) at round {round_}")


def secure_settings(
    base: Path, coordinator: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """TLS with a self-signed pair and join tokens, as a deployment across machines would run."""
    from antorcha.security.tls import make_self_signed
    from antorcha.security.tokens import Role, TokenStore

    cert, key = make_self_signed(base / "tls", ["127.0.0.1", "localhost"])
    tokens = TokenStore(Path(coordinator["data_dir"]) / "tokens.sqlite")
    try:
        operator = tokens.create("demo-operator", Role.OPERATOR)[0]
        join = tokens.create("demo-workers", Role.WORKER)[0]
    finally:
        tokens.close()
    (base / "operator.token").write_text(operator)
    secured = {**coordinator, "auth": "tokens", "tls_cert_file": str(cert), "tls_key_file": str(key)}
    return (
        secured,
        {"operator_token": operator, "tls_ca_file": str(cert)},
        {"token": join, "tls_ca_file": str(cert)},
    )


def run_demo(
    workers: int,
    rounds: int,
    as_json: bool,
    workdir: Path | None = None,
    timeout_s: float = 900,
    churn: bool = False,
    secure: bool = False,
) -> int:
    out = sys.stdout
    tty = out.isatty()
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="antorcha-demo-"))
    coordinator: dict[str, Any] = {"lease_s": 6.0, "data_dir": str(base / "coordinator-data")}
    client_options: dict[str, Any] = {}
    worker_defaults: dict[str, Any] = {}
    if secure:
        coordinator, client_options, worker_defaults = secure_settings(base, coordinator)
    cluster = LocalCluster(
        base,
        run=demo_run_spec(rounds, workers),
        coordinator=coordinator,
        client_options=client_options,
        worker_defaults=worker_defaults,
    )
    schedule = ChurnSchedule(cluster, workers) if churn else None
    start = time.monotonic()
    try:
        address = cluster.start_coordinator()
        print(f"coordinator on {address}; logs in {base}", file=out)
        if cluster.dashboard_url:
            print(
                f"  dashboard: {cluster.dashboard_url} (Prometheus: {cluster.dashboard_url}metrics)", file=out
            )
        if secure:
            print(
                f"  TLS (self-signed: {client_options['tls_ca_file']}) and join tokens are on; watch it: "
                f"antorcha status --coordinator {address} --tls-ca {client_options['tls_ca_file']} "
                f"--token $(cat {base / 'operator.token'})",
                file=out,
            )
        else:
            print(f"  watch it: antorcha status --coordinator {address}", file=out)
        plans = schedule.crash_plans() if schedule else {}
        for i in range(workers):
            name = f"worker-{i}"
            cluster.start_worker(name, {"fault_plan": plans[name]} if name in plans else None)
        print(HEADER, file=out, flush=True)
        shown = 0
        deadline = start + timeout_s
        while True:
            status = cluster.status()
            if schedule is not None:
                schedule.advance(
                    status.round, lambda line: print(("\r" if tty else "") + line, file=out, flush=True)
                )
            done = [r for r in status.rounds if math.isfinite(r.eval_loss)]
            for r in done[shown:]:
                print(("\r" if tty else "") + _row(r) + (" " * 10 if tty else ""), file=out, flush=True)
            shown = len(done)
            if status.phase == "finished" and shown == len(status.rounds):
                break
            if tty:
                steps = ", ".join(
                    f"{w.name}:{w.progress.inner_step}" for w in status.workers if w.state != "left"
                )
                print(f"\r  round {status.round} {status.phase} [{steps}]", end="", file=out, flush=True)
            if time.monotonic() > deadline:
                print(f"demo timed out after {timeout_s}s", file=sys.stderr)
                return 1
            for name, proc in cluster.workers.items():
                if proc.poll() not in (None, 0) and not (schedule and name in schedule.crash_plans()):
                    print(f"{name} crashed ({proc.returncode}):\n{cluster.tail(name)}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        codes = cluster.wait_workers(30)
        status = cluster.status()
        summary = summarize(status, workers)
        summary["seconds"] = round(time.monotonic() - start, 1)
        expected_dead = set(schedule.crash_plans()) if schedule else set()
        failed = {n: c for n, c in codes.items() if c != 0 and n not in expected_dead}
        drop = 1 - summary["final_eval_loss"] / summary["initial_eval_loss"]
        print(
            f"done: {summary['rounds']} rounds, eval loss {summary['initial_eval_loss']:.3f} → "
            f"{summary['final_eval_loss']:.3f} ({drop:.0%} lower), replicas consistent: "
            f"{summary['replicas_consistent']}, data plane {_human(summary['data_plane_bytes'])} vs control "
            f"plane {_human(summary['control_plane_bytes'])}, {summary['seconds']}s",
            file=out,
        )
        if as_json:
            print(json.dumps(summary), file=out, flush=True)
        if failed:
            print(f"workers exited badly: {failed}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        cluster.stop()
