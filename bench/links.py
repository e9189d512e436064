"""How close the slow-link emulations come to the link they are set to: bandwidth and RTT as ratios.

    .venv/bin/python bench/links.py [--bandwidth-mbit 50] [--rtt-ms 80] [--seconds 3]

Lab (needs root): two nodes at the given link; node a sends a bulk TCP stream to node b and plays
request/response ping-pong with it, both directly (bridge address: tbf only) and through ``expose``
(tbf + delay proxy). Bandwidth is the payload rate measured at the receiver (tbf also counts the
Ethernet/IP/TCP headers, about 4 % of a 1500-byte frame, so ~0.96 is a faithful result); RTT is the
median of small-message round trips. The configured RTT between two nodes at R ms is R ms.

Pacer: ``LinkPacer`` in this process on the real clock: two concurrent senders push bytes through the
upload bucket, then round trips are timed.

Prints a table, then one JSON line with the ratios and the method of each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from antorcha.netem import LinkPacer, LinkSpec, NetworkLab, available

PORT = 7100
CHUNK = 256 * 1024
PING_BYTES = 64
PINGS = 15
PACER_METHOD = "application: LinkPacer token buckets (asyncio sleep)"


# --- the two ends, run inside the lab's nodes ------------------------------------------------------


def serve(port: int) -> None:
    """'B' + stream: count to EOF, answer JSON with the receive rate. 'P' + messages: echo them."""
    import threading

    def handle(conn: socket.socket) -> None:
        with conn:
            mode = conn.recv(1)
            if mode == b"P":
                while data := conn.recv(PING_BYTES):
                    conn.sendall(data)
                return
            received, first_len, t_first, t_last = 0, 0, 0.0, 0.0
            while data := conn.recv(CHUNK):
                now = time.perf_counter()
                if not received:
                    first_len, t_first = len(data), now
                received += len(data)
                t_last = now
            # The first read's bytes arrived before t_first could start counting.
            rate = (received - first_len) / (t_last - t_first) if t_last > t_first else 0.0
            conn.sendall(json.dumps({"bytes": received, "bytes_per_s": rate}).encode())

    server = socket.create_server(("0.0.0.0", port), backlog=16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def client(host: str, port: int, nbytes: int) -> None:
    """Bulk ``nbytes`` then ping-pong; print JSON."""
    with socket.create_connection((host, port)) as conn:
        conn.sendall(b"B")
        block = bytes(CHUNK)
        left = nbytes
        while left > 0:
            conn.sendall(block[: min(left, CHUNK)])
            left -= CHUNK
        conn.shutdown(socket.SHUT_WR)
        bulk = json.loads(b"".join(iter(lambda: conn.recv(4096), b"")))
    rtts = []
    with socket.create_connection((host, port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"P")
        message = b"x" * PING_BYTES
        for _ in range(PINGS):
            start = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < PING_BYTES:
                got += len(conn.recv(PING_BYTES - got))
            rtts.append(time.perf_counter() - start)
    print(json.dumps({**bulk, "rtt_s": statistics.median(rtts)}))


# --- the measurements --------------------------------------------------------------------------------


def measure_lab(spec: LinkSpec, seconds: float) -> dict[str, Any]:
    ok, why = available()
    if not ok:
        return {"available": False, "reason": why}
    me = [sys.executable, __file__]
    nbytes = int(spec.bytes_per_s * seconds)
    with NetworkLab({"a": spec, "b": spec}) as lab:
        server = subprocess.Popen(
            lab.command("b", [*me, "_serve", str(PORT)]), stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        paths = {"direct": (lab.address("b"), PORT), "exposed": lab.expose("b", PORT)}
        results = {}
        for name, (host, port) in paths.items():
            argv = lab.command("a", [*me, "_client", host, str(port), str(nbytes)])
            done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
            results[name] = json.loads(done.stdout)
        configured_rtt_s = lab.rtt_ms("a", "b") / 1e3
        server.terminate()
        server.wait()
    exposed, direct = results["exposed"], results["direct"]
    return {
        "available": True,
        "method": lab.method,
        "bandwidth_ratio": exposed["bytes_per_s"] / spec.bytes_per_s,
        "rtt_ratio": exposed["rtt_s"] / configured_rtt_s if configured_rtt_s else None,
        "direct_bandwidth_ratio": direct["bytes_per_s"] / spec.bytes_per_s,
        "direct_rtt_ms": direct["rtt_s"] * 1e3,
        "rtt_ms": exposed["rtt_s"] * 1e3,
        "configured_rtt_ms": configured_rtt_s * 1e3,
    }


async def _pace(spec: LinkSpec, seconds: float) -> dict[str, Any]:
    pacer = LinkPacer.from_spec(spec)
    # Enough bytes for ~seconds/2 of link time, split between two concurrent senders.
    per_sender = int(spec.bytes_per_s * seconds / 4)

    async def sender() -> None:
        for _ in range(0, per_sender, 64 * 1024):
            await pacer.send(64 * 1024)

    start = time.perf_counter()
    await asyncio.gather(sender(), sender())
    bandwidth = pacer.bytes_sent / (time.perf_counter() - start)
    rtts = []
    for _ in range(PINGS):
        start = time.perf_counter()
        await pacer.round_trip()
        rtts.append(time.perf_counter() - start)
    rtt = statistics.median(rtts)
    return {
        "method": PACER_METHOD,
        "bandwidth_ratio": bandwidth / spec.bytes_per_s,
        "rtt_ratio": rtt / spec.rtt_s if spec.rtt_s else None,
        "rtt_ms": rtt * 1e3,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bandwidth-mbit", type=float, default=50.0)
    parser.add_argument("--rtt-ms", type=float, default=80.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="bulk transfer length at the link rate")
    args = parser.parse_args()
    spec = LinkSpec(args.bandwidth_mbit, args.rtt_ms)

    lab = measure_lab(spec, args.seconds)
    pacer = asyncio.run(_pace(spec, args.seconds))

    print(f"link {spec} (each node); pair RTT {spec.rtt_ms:g} ms")
    print(f"{'path':<28} {'bandwidth ratio':>16} {'RTT ms':>8} {'RTT ratio':>10}")
    if lab["available"]:
        print(
            f"{'lab direct (tbf only)':<28} {_fmt(lab['direct_bandwidth_ratio']):>16} "
            f"{_fmt(lab['direct_rtt_ms'], 1):>8} {'—':>10}"
        )
        print(
            f"{'lab exposed (tbf + proxy)':<28} {_fmt(lab['bandwidth_ratio']):>16} "
            f"{_fmt(lab['rtt_ms'], 1):>8} {_fmt(lab['rtt_ratio']):>10}"
        )
    else:
        print(f"{'lab':<28} unavailable: {lab['reason']}")
    print(
        f"{'pacer (in-process)':<28} {_fmt(pacer['bandwidth_ratio']):>16} "
        f"{_fmt(pacer['rtt_ms'], 1):>8} {_fmt(pacer['rtt_ratio']):>10}"
    )
    print(json.dumps({"bench": "links", "spec": str(spec), "lab": lab, "pacer": pacer}))


if __name__ == "__main__":
    main()
