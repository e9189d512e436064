"""Dashboard responsiveness with a long run: 100 workers and 10,000 rounds of history.

    python bench/dashboard.py                       # 100 workers, 10,000 rounds
    python bench/dashboard.py --workers 300 --rounds 50000

How the history is made: a data directory is written the way a coordinator writes it (`RunStore`: the
run spec, 10,000 round rows with decaying losses, the workers, per-worker compute/averaging seconds
of the newest rounds, a few thousand join/leave/crash events; a real checkpoint of round 10,000 via
`CheckpointStore`). A real coordinator process is started on it and restores it. Then 100 workers
join over gRPC under the stored ids and heartbeat with progress every 2 s from this process (they
train nothing: the coordinator sees 100 live workers and serves 50 heartbeats/s while it is timed).

What is timed: each JSON API document the page fetches (and a page of the round log and /metrics),
20 sequential requests each over HTTP; and the page in a real headless Chromium, from navigation to
the first full draw (every document fetched and drawn: 100 worker rows, the downsampled loss curves,
the timeline, the events), over 5 fresh loads. Target: < 1 s for each. The machine is shared and slow
(2 cores): the figures are upper bounds of what the dashboard costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from antorcha import PROTOCOL_VERSION
from antorcha.config import RunSpec
from antorcha.coordinator.checkpoints import CheckpointStore
from antorcha.coordinator.replica import CoordinatorReplica
from antorcha.coordinator.store import RunStore
from antorcha.experiments.browser import HeadlessChromium
from antorcha.experiments.cluster import LocalCluster
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.proto.antorcha.v1 import coordinator_pb2_grpc as pb_grpc

TARGET_MS = 1000.0
RUN = {
    "run_id": "bench-dashboard",
    "model_size": "nano",
    "seq_len": 128,
    "batch_size": 16,
    "inner_steps": 100,
    "min_workers": 1,
    "round_deadline_s": 3600.0,
    "eval_batches": 1,
}
ENDPOINTS = (
    "api/status",
    "api/series?points=600",
    "api/timeline?rounds=20",
    "api/events?limit=100",
    "api/rounds?limit=100",
    "metrics",
)


def _worker_ids(n: int) -> list[str]:
    return [f"w-{i:010x}" for i in range(n)]


def build_history(data_dir: Path, spec: RunSpec, workers: int, rounds: int, seed: int = 0) -> None:
    """A coordinator's data directory after `rounds` rounds with `workers` workers."""
    rng = random.Random(seed)
    store = RunStore(data_dir / "run.sqlite")
    store.bind_run(spec.model_dump_json(), spec.sha256())
    ids = _worker_ids(workers)
    start = time.time() - rounds * 60.0
    tokens_per_worker = spec.inner_steps * spec.tokens_per_step
    with store.transaction() as db:
        store.set_meta("initial_eval_loss", repr(5.55))
        for slot, worker_id in enumerate(ids):
            gpu = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 4090")[slot % 3]
            db.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    worker_id,
                    f"volunteer-{slot:03d}",
                    slot,
                    "active",
                    rng.randrange(rounds // 2, rounds),
                    json.dumps({"peer_id": f"Qm{worker_id}", "maddrs": [], "client_mode": True}),
                    json.dumps(
                        {"kind": "cuda", "name": gpu, "memory_bytes": 80 << 30, "tokens_per_second": 0}
                    ),
                    start,
                ),
            )
        rows = []
        for r in range(rounds):
            progress = r / max(1, rounds - 1)
            loss = 2.1 + 3.4 * math.exp(-6 * progress)
            seconds = 55 + rng.random() * 10
            rows.append(
                (
                    r,
                    workers,
                    workers * tokens_per_worker,
                    loss + rng.gauss(0, 0.03),
                    loss + 0.05 + rng.gauss(0, 0.01),
                    workers * 2 * 4 * 123_000,
                    seconds,
                    f"{rng.getrandbits(128):032x}",
                    1,
                    0,
                    start + r * 60.0,
                )
            )
        db.executemany("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        timings = [
            (r, worker_id, tokens_per_worker, 50 + rng.random() * 5, 2 + rng.random() * 3)
            for r in range(max(0, rounds - 200), rounds)
            for worker_id in ids
        ]
        store.save_round_workers(timings)
        for i in range(3000):  # churn over the run's life
            kind = rng.choice(("join", "join", "leave", "crash"))
            db.execute(
                "INSERT INTO events (at, kind, worker_id, round, detail) VALUES (?, ?, ?, ?, ?)",
                (
                    start + i * rounds * 20.0 / 3000,
                    kind,
                    rng.choice(ids),
                    i * rounds // 3000,
                    f"{kind} (history)",
                ),
            )
    store.close()
    replica = CoordinatorReplica(
        spec
    )  # a real checkpoint of round `rounds`, so the coordinator resumes there
    replica.state.round = rounds
    round_, data, _ = replica.encoded()
    CheckpointStore(data_dir / "checkpoints", 3).save(round_, data, replica.checksum)


class FakeWorkers(threading.Thread):
    """`n` workers that join under the stored ids and heartbeat with progress, over real gRPC."""

    def __init__(self, address: str, ids: list[str], interval_s: float = 2.0) -> None:
        super().__init__(daemon=True, name="fake-workers")
        self.address, self.ids, self.interval_s = address, ids, interval_s
        self.joined = threading.Event()
        self.heartbeats = 0
        self._halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            for slot, worker_id in enumerate(self.ids):
                await stub.Join(
                    pb.JoinRequest(
                        protocol_version=PROTOCOL_VERSION,
                        name=f"volunteer-{slot:03d}",
                        worker_id=worker_id,
                        device=pb.DeviceInfo(
                            kind="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 << 30
                        ),
                        peer=pb.PeerInfo(peer_id=f"Qm{worker_id}", client_mode=True),
                    ),
                    timeout=30,
                )
            self.joined.set()
            await asyncio.gather(*(self._beat(stub, i, w) for i, w in enumerate(self.ids)))

    async def _beat(self, stub: pb_grpc.CoordinatorStub, slot: int, worker_id: str) -> None:
        rng = random.Random(slot)
        await asyncio.sleep(rng.random() * self.interval_s)  # spread them out, as real workers are
        step = 0
        while not self._halt.is_set():
            step += 1
            progress = pb.Progress(
                inner_step=step % 100, tokens=step * 2048, loss=2.2 + rng.random() * 0.2,
                tokens_per_second=40_000 + rng.random() * 20_000,
            )  # fmt: skip
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, progress=progress), timeout=30)
            except grpc.RpcError:
                if self._halt.is_set():  # the coordinator is going away at the end of the benchmark
                    return
                raise
            self.heartbeats += 1
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        self._halt.set()


def time_api(base: str, requests: int) -> list[dict[str, Any]]:
    rows = []
    for path in ENDPOINTS:
        times, size = [], 0
        for _ in range(requests):
            started = time.perf_counter()
            with urllib.request.urlopen(base + path, timeout=30) as response:
                size = len(response.read())
            times.append(1000 * (time.perf_counter() - started))
        rows.append(
            {
                "what": "/" + path,
                "median_ms": statistics.median(times),
                "max_ms": max(times),
                "bytes": size,
            }
        )
    return rows


async def time_page(url: str, loads: int) -> tuple[list[float], list[float], dict[str, Any]]:
    """Per load: ms to the first full draw, and ms to DOMContentLoaded (page and scripts, before data)."""
    renders: list[float] = []
    loaded: list[float] = []
    shown: dict[str, Any] = {}
    async with HeadlessChromium(width=1400, height=1000) as browser:
        for _ in range(loads):
            await browser.navigate("about:blank")
            await browser.navigate(url)
            await browser.wait_for("document.body && document.body.dataset.ready === '1'", 60)
            renders.append(float(await browser.evaluate("document.body.dataset.renderMs")))
            loaded.append(
                float(
                    await browser.evaluate(
                        "performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"
                    )
                )
            )
        shown = await browser.evaluate(
            """({workers: document.querySelectorAll('#workers tbody tr').length,
                 points: Number(document.getElementById('loss-chart').dataset.points),
                 round: Number(document.getElementById('round').dataset.round),
                 timeline: Number(document.getElementById('timeline').dataset.workers),
                 events: document.querySelectorAll('#events tbody tr').length})"""
        )
    return renders, loaded, dict(shown)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per API document")
    parser.add_argument("--loads", type=int, default=5, help="timed page loads in Chromium")
    parser.add_argument("--workdir", help="keep the data directory and logs here")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="antorcha-bench-dashboard-"))
    spec = RunSpec.model_validate(RUN)
    data_dir = workdir / "coordinator-data"
    started = time.monotonic()
    build_history(data_dir, spec, args.workers, args.rounds)
    print(f"history of {args.rounds} rounds, {args.workers} workers in {time.monotonic() - started:.1f}s")

    cluster = LocalCluster(
        workdir,
        run=RUN,
        coordinator={"data_dir": str(data_dir), "lease_s": 30.0, "heartbeat_interval_s": 2.0},
    )
    fakes: FakeWorkers | None = None
    try:
        cluster.start_coordinator(timeout_s=300)
        fakes = FakeWorkers(cluster.address, _worker_ids(args.workers))
        fakes.start()
        if not fakes.joined.wait(120):
            raise RuntimeError("the workers did not all join")
        status = cluster.wait_for(lambda s: sum(w.state != "lost" for w in s.workers) == args.workers, 60)
        assert status.rounds_total == args.rounds, status.rounds_total
        time.sleep(3.0)  # every worker has heartbeated with progress
        api = time_api(cluster.dashboard_url, args.requests)
        renders, loaded, shown = asyncio.run(time_page(cluster.dashboard_url, args.loads))
        heartbeats = fakes.heartbeats
    finally:
        try:
            if fakes is not None:
                fakes.stop()
                fakes.join(10)
        finally:
            cluster.stop()

    page = {"what": "page render (Chromium)", "median_ms": statistics.median(renders), "max_ms": max(renders)}
    scripts = {
        "what": "  of which page+scripts",
        "median_ms": statistics.median(loaded),
        "max_ms": max(loaded),
    }
    print(f"\n{'what':<32} {'median ms':>10} {'max ms':>10} {'bytes':>10}")
    for row in [*api, page, scripts]:
        size = f"{row['bytes']:>10}" if "bytes" in row else f"{'':>10}"
        print(f"{row['what']:<32} {row['median_ms']:>10.1f} {row['max_ms']:>10.1f} {size}")
    api_max = max(row["max_ms"] for row in api)
    print(
        f"\npage showed {shown['workers']} worker rows, {shown['points']} loss points for "
        f"{args.rounds} rounds, round {shown['round']}, {shown['timeline']} workers in the timeline, "
        f"{shown['events']} events; {heartbeats} heartbeats served meanwhile"
    )
    ok = api_max < TARGET_MS and page["max_ms"] < TARGET_MS and shown["workers"] == args.workers
    result = {
        "workers": args.workers,
        "rounds": args.rounds,
        "api_median_ms": {row["what"]: round(row["median_ms"], 2) for row in api},
        "api_max_ms": round(api_max, 2),
        "page_render_median_ms": round(page["median_ms"], 1),
        "page_render_max_ms": round(page["max_ms"], 1),
        "page_dom_content_loaded_median_ms": round(scripts["median_ms"], 1),
        "page_worker_rows": shown["workers"],
        "page_loss_points": shown["points"],
        "target_ms": TARGET_MS,
        "within_target": ok,
    }
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
