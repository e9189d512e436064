"""The `antorcha` command: coordinator, worker, demo and status."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from antorcha.config import ConfigError, CoordinatorConfig, WorkerConfig, load_config
from antorcha.logs import setup_logging


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


def _worker(args: argparse.Namespace) -> int:
    config = load_config(WorkerConfig, args.config)
    from antorcha.worker.daemon import Worker

    updates = {
        k: v
        for k, v in {"coordinator": args.coordinator, "name": args.name, "device": args.device}.items()
        if v
    }
    settings = config.worker.model_copy(update=updates)
    WorkerConfig.model_validate({"worker": settings.model_dump()})  # re-validate the overrides
    setup_logging("worker", args.log_level)
    return Worker(settings).run()


def _demo(args: argparse.Namespace) -> int:
    from antorcha.demo import run_demo

    rounds = args.rounds if args.rounds is not None else (8 if args.churn else 6)
    workdir = Path(args.workdir) if args.workdir else None
    return run_demo(args.workers, rounds, args.json, workdir, churn=args.churn)


def _status(args: argparse.Namespace) -> int:
    from antorcha.worker.client import CoordinatorClient

    client = CoordinatorClient(args.coordinator, timeout_s=10)
    status = client.run_status()
    client.close()
    if args.json:
        print(json.dumps(MessageToDict(status, preserving_proto_field_name=True)))
        return 0
    last = status.rounds[-1] if status.rounds else None
    print(f"run {status.run_id}: round {status.round} ({status.phase}), {len(status.workers)} workers")
    if last is not None:
        print(f"last round {last.round}: eval loss {last.eval_loss:.4f}, train loss {last.train_loss:.4f}")
    for w in status.workers:
        print(
            f"  {w.worker_id} {w.name:<16} {w.state:<10} rounds={w.rounds_contributed} device={w.device.kind}"
        )
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
    p.set_defaults(fn=_worker)

    p = sub.add_parser("demo", help="run a coordinator and workers locally and show training")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="rounds to train (default 6; 8 with --churn)")
    p.add_argument("--churn", action="store_true", help="workers join, leave and crash during the run")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--workdir", help="where logs and configs go (default: a new temp folder)")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("status", help="show a coordinator's run status")
    p.add_argument("--coordinator", default="127.0.0.1:50051")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"antorcha: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
