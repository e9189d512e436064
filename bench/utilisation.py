"""Compute utilisation over slow links: the share of each worker's wall time spent in inner steps,
with blocking averaging and with overlapped averaging (round r averages while round r+1 trains).

    python bench/utilisation.py                      # 4 workers, 100 Mbit/s, 100 ms RTT links
    python bench/utilisation.py --link 50mbit/200ms --rounds 8

Links are real where this machine allows it (root, iproute2): every process runs in its own network
namespace, each worker's veth is shaped by the kernel (tc tbf, both directions) and the hivemind and
gRPC connections go through TCP delay proxies that add the link's latency. Otherwise the workers'
data plane is paced in the application (token buckets + one RTT per exchange). The JSON line says
which (`link`). Both runs use the same spec, links, and workers; only `overlap` differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from antorcha.experiments.cluster import LocalCluster
from antorcha.netem import LinkSpec, NetworkLab, available, parse_link

GRPC_PORT, P2P_PORT = 50051, 41000


def _spec(args: argparse.Namespace, overlap: bool) -> dict[str, Any]:
    return {
        "run_id": "overlap" if overlap else "blocking",
        "model_size": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "inner_steps": args.inner_steps,
        "round_mode": args.round_mode,
        "codec": args.codec,
        "overlap": overlap,
        "max_rounds": args.rounds,
        "min_workers": args.workers,
        "inner_warmup_steps": 5,
        "eval_batches": 1,
        "round_deadline_s": 900.0,
        "allreduce_timeout_s": 120.0,
    }


@contextlib.contextmanager
def _lab(workers: int, link: LinkSpec) -> Iterator[NetworkLab]:
    nodes: dict[str, LinkSpec | None] = {"coordinator": None} | {f"w{i}": link for i in range(workers)}
    with NetworkLab(nodes) as lab:
        yield lab


def _run(workdir: Path, args: argparse.Namespace, overlap: bool, use_lab: bool) -> dict[str, Any]:
    link = parse_link(args.link)
    workers = [f"w{i}" for i in range(args.workers)]
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(_lab(args.workers, link)) if use_lab else None
        wrap = (lambda name, argv: lab.command(name, argv)) if lab is not None else None
        coordinator: dict[str, Any] = {"lease_s": 60.0, "torch_threads": 1}
        extra: dict[str, dict[str, Any]] = {w: {} for w in workers}
        worker_address = status_address = None
        if lab is not None:
            ip = lab.address("coordinator")
            hub, p2p_port = lab.expose("coordinator", P2P_PORT)
            # The lab's network exists only inside this benchmark's namespaces: no tokens, no TLS.
            coordinator |= {
                "auth": "off",
                "allow_plaintext": True,
                "host": ip,
                "port": GRPC_PORT,
                "p2p_host_maddrs": [f"/ip4/{ip}/tcp/{P2P_PORT}"],
                "p2p_announce_maddrs": [f"/ip4/{hub}/tcp/{p2p_port}"],
            }
            worker_address = "{}:{}".format(*lab.expose("coordinator", GRPC_PORT))
            status_address = "{}:{}".format(*lab.expose_to_host("coordinator", GRPC_PORT))
            for w in workers:
                hub, port = lab.expose(w, P2P_PORT)
                extra[w] = {
                    "p2p_host_maddrs": [f"/ip4/{lab.address(w)}/tcp/{P2P_PORT}"],
                    "p2p_announce_maddrs": [f"/ip4/{hub}/tcp/{port}"],
                }
        else:
            for w in workers:
                extra[w] = {"emulate_link": args.link}
        cluster = stack.enter_context(
            LocalCluster(workdir, run=_spec(args, overlap), coordinator=coordinator, wrap=wrap)
        )
        started = time.monotonic()
        cluster.start_coordinator(worker_address=worker_address, status_address=status_address)
        for w in workers:
            cluster.start_worker(w, extra[w] | {"summary_file": str(workdir / f"{w}.summary.json")})
        status = cluster.wait_for(
            lambda s: s.phase == "finished" and bool(s.rounds) and math.isfinite(s.rounds[-1].eval_loss),
            timeout_s=3600,
            poll_s=1.0,
        )
        cluster.wait_workers(300)
        seconds = time.monotonic() - started
    summaries = [json.loads((workdir / f"{w}.summary.json").read_text()) for w in workers]
    utilisation = [s["utilisation"] for s in summaries]
    return {
        "overlap": overlap,
        "utilisation": sum(utilisation) / len(utilisation),
        "per_worker": utilisation,
        "rounds": len(status.rounds),
        "round_seconds": sum(r.seconds for r in status.rounds) / max(1, len(status.rounds)),
        "compute_seconds": sum(s["compute_seconds"] for s in summaries) / len(summaries),
        "wall_seconds": sum(s["wall_seconds"] for s in summaries) / len(summaries),
        "bytes_sent_per_round": sum(s["data_plane_bytes_sent"] for s in summaries)
        / len(summaries)
        / max(1, len(status.rounds)),
        "eval_loss": status.rounds[-1].eval_loss if status.rounds else math.nan,
        "replicas_consistent": status.replicas_consistent,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", default="100mbit/100ms", help="every worker's link")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--model", default="small")
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--codec", default="none")
    parser.add_argument("--round-mode", default="fixed_steps", choices=["fixed_steps", "token_budget"])
    parser.add_argument(
        "--pacer", action="store_true", help="use the application pacer even if the lab works"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="antorcha-bench-util-"))
    lab_ok, why = available()
    use_lab = lab_ok and not args.pacer
    if use_lab:
        method = f"{why} (coordinator unshaped; worker-worker RTT {args.link.split('/')[1]})"
    else:
        method = "application: LinkPacer token buckets + one RTT per exchange in the data plane"
        if not args.pacer:
            print(f"kernel shaping unavailable ({why}); using the pacer", file=sys.stderr)
    results = {}
    for overlap in (False, True):
        print(f"{'overlap' if overlap else 'blocking'} run ...", file=sys.stderr, flush=True)
        results[overlap] = _run(workdir / ("overlap" if overlap else "blocking"), args, overlap, use_lab)

    print()
    print(
        f"{args.workers} workers on {args.link} links, model {args.model}, {args.inner_steps} inner "
        f"steps of {args.batch_size}x{args.seq_len} tokens per round ({args.round_mode}), codec "
        f"{args.codec}, {args.rounds} rounds; link: {method}"
    )
    print(f"{'mode':>9} {'utilisation':>11} {'round s':>8} {'compute s':>9} {'wall s':>7} {'MB/round':>8}")
    for overlap, r in results.items():
        print(
            f"{'overlap' if overlap else 'blocking':>9} {r['utilisation']:>11.3f} {r['round_seconds']:>8.2f} "
            f"{r['compute_seconds']:>9.1f} {r['wall_seconds']:>7.1f} {r['bytes_sent_per_round'] / 1e6:>8.1f}"
        )
    ratio = results[True]["utilisation"] / max(results[False]["utilisation"], 1e-9)
    print(f"overlap / blocking utilisation: {ratio:.2f}x; logs in {workdir}")
    print(
        json.dumps(
            {
                "overlap": results[True]["utilisation"],
                "no_overlap": results[False]["utilisation"],
                "link": method,
                "link_spec": args.link,
                "ratio": ratio,
                "details": {("overlap" if k else "no_overlap"): v for k, v in results.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
