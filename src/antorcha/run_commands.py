"""`antorcha run submit|list|cancel`: the run queue of a coordinator from the shell (the same calls as
`antorcha.Client`)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def _client(args: argparse.Namespace) -> Any:
    from antorcha.api import Client

    return Client(args.coordinator, token=args.token, tls=args.tls, tls_ca_file=args.tls_ca)


def _when(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix)) if unix else "–"


def _run(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.run_command == "submit":
            handle = client.submit(args.spec)
            info = handle.info()
            print(f"run {info.run_id} queued at position {info.position}")
            if args.wait:
                info = handle.wait(timeout_s=args.timeout)
                print(
                    json.dumps(
                        {
                            "run_id": info.run_id,
                            "state": info.state,
                            **{k: v for k, v in info.summary.items() if k != "round_log"},
                        }
                    )
                )
                return 0 if info.state == "finished" else 1
            return 0
        if args.run_command == "list":
            runs = client.runs()
            if args.json:
                print(
                    json.dumps(
                        [
                            {
                                **r.__dict__,
                                "summary": {k: v for k, v in r.summary.items() if k != "round_log"},
                            }
                            for r in runs
                        ]
                    )
                )
                return 0
            print(f"{'#':>3} {'run':<24} {'state':<10} {'submitted':>9} {'started':>9} {'ended':>9}  result")
            for r in runs:
                loss = r.summary.get("final_eval_loss")
                result = f"{r.summary.get('rounds', 0)} rounds, eval {loss:.4f}" if loss is not None else ""
                print(
                    f"{r.position:>3} {r.run_id[:24]:<24} {r.state:<10} {_when(r.submitted_unix):>9} "
                    f"{_when(r.started_unix):>9} {_when(r.finished_unix):>9}  {result or r.detail}"
                )
            return 0
        print(client.cancel(args.run_id, args.reason))
        return 0


def add_run_parsers(sub: Any, connection_options: Any) -> None:
    p = sub.add_parser("run", help="the coordinator's run queue: submit, list, cancel")
    rsub = p.add_subparsers(dest="run_command", required=True)
    s = rsub.add_parser("submit", help="queue a run (a TOML file with a [run] table)")
    s.add_argument("spec", help="TOML file: a [run] table (as in the coordinator's config)")
    s.add_argument("--wait", action="store_true", help="wait until it ends and print its summary")
    s.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many s")
    connection_options(s)
    s.set_defaults(fn=_run)
    ls = rsub.add_parser("list", help="every run: finished, running, queued")
    ls.add_argument("--json", action="store_true")
    connection_options(ls)
    ls.set_defaults(fn=_run)
    c = rsub.add_parser("cancel", help="drop a queued run, or end a running one after its round")
    c.add_argument("run_id")
    c.add_argument("--reason", default="")
    connection_options(c)
    c.set_defaults(fn=_run)
