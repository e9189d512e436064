"""The `antorcha` command: coordinator, worker, demo; the operator's status, workers, evict, pause and
resume, which talk to a coordinator's gRPC port (with an operator token when its auth is on); and
`token` and `tls` for credentials.

Exit codes: 0 done; 1 an unexpected error; 2 a bad config or argument; 3 the coordinator refused
(e.g. a protocol version mismatch, or this worker was evicted); 4 the coordinator could not be
reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from antorcha.config import ConfigError, CoordinatorConfig, WorkerConfig, WorkerSettings, load_config
from antorcha.logs import setup_logging
from antorcha.run_commands import add_run_parsers
from antorcha.security.commands import add_connection_options, add_security_parsers


def _coordinator(args: argparse.Namespace) -> int:
    config = load_config(CoordinatorConfig, args.config)  # refuse a bad config before heavy imports
    from antorcha.coordinator.server import serve

    if args.port is not None:
        config = config.model_copy(
            update={"coordinator": config.coordinator.model_copy(update={"port": args.port})}
        )
    setup_logging("coordinator", args.log_level)
    asyncio.run(serve(config, Path(args.ready_file) if args.ready_file else None))
    return 0


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings: its config file and environment, then the command line's overrides."""
    config = load_config(WorkerConfig, args.config)
    updates: dict[str, object] = {
        k: v
        for k, v in {
            "coordinator": args.coordinator,
            "name": args.name,
            "device": args.device,
            "tls_ca_file": args.tls_ca,
        }.items()
        if v
    }
    if args.token_file:
        # From a file, not the command line: a token in argv is visible to every user of the machine.
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"worker --token-file: cannot read {args.token_file}: {e}") from e
        if not token:
            raise ConfigError(f"worker --token-file: {args.token_file} is empty")
        updates["token"] = token
    settings = config.worker.model_copy(update=updates)
    WorkerConfig.model_validate({"worker": settings.model_dump()})  # re-validate the overrides
    return settings


def _worker(args: argparse.Namespace) -> int:
    from antorcha.worker.daemon import Worker

    settings = worker_settings(args)
    setup_logging("worker", args.log_level)
    return Worker(settings).run()  # refusals and an unreachable coordinator are reported by main()


def _demo(args: argparse.Namespace) -> int:
    from antorcha.demo import run_demo

    rounds = args.rounds if args.rounds is not None else (8 if args.churn else 6)
    workdir = Path(args.workdir) if args.workdir else None
    return run_demo(args.workers, rounds, args.json, workdir, churn=args.churn, secure=args.secure)


def _operator_client(args: argparse.Namespace) -> Any:
    from antorcha.worker.client import CoordinatorClient

    return CoordinatorClient(
        args.coordinator, timeout_s=10, tls=args.tls, tls_ca_file=args.tls_ca, operator_token=args.token
    )


def _fetch_status(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    from antorcha.dashboard.api import status_document
    from antorcha.worker.client import CoordinatorRefusedError, CoordinatorUnreachableError

    address = args.coordinator
    client = _operator_client(args)
    try:
        return status_document(client.run_status(rounds_limit=rounds))
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):  # type: ignore[attr-defined]
            raise CoordinatorRefusedError(e.code(), e.details()) from None  # type: ignore[attr-defined]
        raise CoordinatorUnreachableError(
            f"the coordinator at {address} did not answer ({e.code().name}: {e.details()})"  # type: ignore[attr-defined]
        ) from None
    finally:
        client.close()


def _loss(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _status(args: argparse.Namespace) -> int:
    doc = _fetch_status(args, args.rounds)
    if args.json:  # the same document as the dashboard's /api/status (plus the newest rounds)
        print(json.dumps(doc))
        return 0
    paused = " · paused" if doc["paused"] and doc["phase"] != "paused" else ""
    of = f"/{doc['max_rounds']}" if doc["max_rounds"] else ""
    print(
        f"run {doc['run_id']}: round {doc['round']}{of} ({doc['phase']}{paused}), "
        f"{doc['active_workers']} active of {len(doc['workers'])} workers"
    )
    print(
        f"train loss {_loss(doc['train_loss'])}, eval loss {_loss(doc['eval_loss'])} "
        f"(from {_loss(doc['initial_eval_loss'])}), {doc['tokens']} tokens, "
        f"{doc['tokens_per_second'] or 0:.0f} tokens/s"
    )
    for r in doc["rounds"]:
        print(
            f"  round {r['round']:>5}: {r['workers']} workers, train {_loss(r['train_loss'])}, "
            f"eval {_loss(r['eval_loss'])}, {r['seconds'] or 0:.1f}s"
        )
    _print_workers(doc["workers"])
    return 0


def _print_workers(workers: list[dict[str, Any]]) -> None:
    print(
        f"  {'id':<14} {'name':<16} {'state':<10} {'device':<6} {'tokens/s':>9} {'heartbeat':>9} "
        f"{'rounds':>6} {'tokens':>10}"
    )
    for w in workers:
        rate = f"{w['tokens_per_second'] or 0:.0f}"
        beat = f"{w['seconds_since_heartbeat'] or 0:.1f}s"
        detail = f"  ({w['detail']})" if w["detail"] else ""
        print(
            f"  {w['worker_id']:<14} {w['name'][:16]:<16} {w['state']:<10} {w['device']['kind']:<6} "
            f"{rate:>9} {beat:>9} {w['rounds_contributed']:>6} {w['tokens']:>10}{detail}"
        )


def _workers(args: argparse.Namespace) -> int:
    doc = _fetch_status(args, 0)
    if args.json:
        print(json.dumps({"round": doc["round"], "workers": doc["workers"]}))
        return 0
    _print_workers(doc["workers"])
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 if the coordinator answers Discover (needs no token: fit for container health checks)."""
    from antorcha.worker.client import CoordinatorClient

    client = CoordinatorClient(
        args.coordinator, timeout_s=args.timeout, tls=args.tls, tls_ca_file=args.tls_ca
    )
    try:
        found = client.discover(patience_s=args.timeout)
    finally:
        client.close()
    state = "training" if found.run_active else "idle"
    print(
        f"ok: run {found.run_id} ({state}), protocol {found.protocol_version}, "
        f"antorcha {found.software_version}"
    )
    return 0


def _operator(args: argparse.Namespace) -> int:
    client = _operator_client(args)
    try:
        if args.command == "pause":
            answer = client.pause(args.reason)
        elif args.command == "resume":
            answer = client.resume()
        else:
            answer = client.evict(args.worker, args.reason)
    finally:
        client.close()
    print(answer.message if answer.changed else f"nothing to do: {answer.message}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="antorcha", description=__doc__)
    parser.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (default: $ANTORCHA_LOG_LEVEL or INFO)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coordinator", help="run the coordinator service")
    p.add_argument("--config", help="TOML file with [coordinator] and [run] tables")
    p.add_argument("--port", type=int, help="override coordinator.port (0 = any free port)")
    p.add_argument("--ready-file", help="write {address, pid} as JSON here once serving")
    p.set_defaults(fn=_coordinator)

    p = sub.add_parser("worker", help="run a worker that joins a coordinator")
    p.add_argument("--config", help="TOML file with a [worker] table")
    p.add_argument("--coordinator", help="host:port of the coordinator")
    p.add_argument("--name", help="name shown to the operator")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--token-file", help="file holding the join token the operator gave you")
    p.add_argument("--tls-ca", help="the coordinator's certificate (PEM), if not from a public CA")
    p.set_defaults(fn=_worker)

    p = sub.add_parser("demo", help="run a coordinator and workers locally and show training")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="rounds to train (default 6; 8 with --churn)")
    p.add_argument("--churn", action="store_true", help="workers join, leave and crash during the run")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument(
        "--secure", action="store_true", help="TLS (self-signed) and join tokens on, as across machines"
    )
    p.add_argument("--workdir", help="where logs and configs go (default: a new temp folder)")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("status", help="show a coordinator's run status")
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="print the dashboard's /api/status document")
    p.add_argument("--rounds", type=int, default=5, help="also show the newest N rounds (default 5)")
    p.set_defaults(fn=_status)

    p = sub.add_parser("workers", help="list a coordinator's workers")
    add_connection_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_workers)

    p = sub.add_parser("evict", help="remove a worker from the run for good (it may not rejoin)")
    p.add_argument("worker", help="worker id (see `antorcha workers`)")
    p.add_argument("--reason", default="", help="told to the worker and kept in the events")
    add_connection_options(p)
    p.set_defaults(fn=_operator)

    p = sub.add_parser("pause", help="open no new round until resume (the round in flight finishes)")
    p.add_argument("--reason", default="", help="kept in the events")
    add_connection_options(p)
    p.set_defaults(fn=_operator)

    p = sub.add_parser("resume", help="open rounds again after a pause")
    add_connection_options(p)
    p.set_defaults(fn=_operator)

    p = sub.add_parser("health", help="exit 0 if the coordinator answers (no token needed)")
    add_connection_options(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    p.set_defaults(fn=_health)

    add_security_parsers(sub)
    add_run_parsers(sub, add_connection_options)

    from antorcha.experiments.command import add_experiment_parser  # its heavy imports stay in handlers

    add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"antorcha: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the two ways a coordinator says no: print them for a person, no traceback
        from antorcha.worker.client import CoordinatorRefusedError, CoordinatorUnreachableError

        if isinstance(e, CoordinatorRefusedError):
            print(f"antorcha {args.command}: {e}", file=sys.stderr)
            return 3
        if isinstance(e, CoordinatorUnreachableError):
            print(f"antorcha {args.command}: {e}", file=sys.stderr)
            return 4
        raise


if __name__ == "__main__":
    sys.exit(main())
