"""The hivemind data plane with real peers, each in its own process: exact weighted means, identical
replicas, and what happens when a peer sends NaN or dies before averaging."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

import pytest
import torch

from antorcha.averaging.base import AveragingGroup, GroupMember, PeerDescriptor
from antorcha.averaging.codecs import encoded_size

pytestmark = pytest.mark.slow
SIZE = 300_000  # two chunks per span for some members


def _peer_main(conn: Connection, initial_peers: list[str], client_mode: bool) -> None:
    os.setsid()  # own process group: teardown can reap the DHT process and p2pd it forks
    from antorcha.averaging.hivemind_backend import HivemindBackend

    backend = HivemindBackend(initial_peers=initial_peers, client_mode=client_mode)
    conn.send((backend.peer, backend.bootstrap_maddrs()))
    group, vector, weight, behaviour = conn.recv()
    if behaviour == "die":
        os._exit(17)  # gone without a word, after the coordinator put it in the group
    if behaviour == "nan":
        vector = vector.clone()
        vector[123] = float("nan")
    start = time.monotonic()
    result = backend.all_reduce(group, vector, weight)
    conn.send((result.average, result.failed_spans, result.bytes_total, time.monotonic() - start))
    backend.close()


def _recv(conn: Connection, timeout_s: float = 120.0) -> object:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"peer process said nothing for {timeout_s}s")
    return conn.recv()


@dataclass
class Peer:
    process: mp.Process
    conn: Connection
    descriptor: PeerDescriptor


@pytest.fixture
def spawn_peers() -> Iterator[object]:
    ctx = mp.get_context("spawn")
    peers: list[Peer] = []

    def spawn(n: int, client_modes: list[bool] | None = None) -> list[Peer]:
        modes = client_modes or [False] * n
        first_conn, child = ctx.Pipe()
        proc = ctx.Process(target=_peer_main, args=(child, [], modes[0]), daemon=False)
        proc.start()
        descriptor, bootstrap = _recv(first_conn)  # type: ignore[misc]
        peers.append(Peer(proc, first_conn, descriptor))
        pending = []
        for mode in modes[1:]:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_peer_main, args=(child, bootstrap, mode), daemon=False)
            proc.start()
            pending.append((proc, conn))
        for proc, conn in pending:
            peers.append(Peer(proc, conn, _recv(conn)[0]))  # type: ignore[index]
        return peers

    yield spawn
    for p in peers:  # every member has its results, so no reducer is still needed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.process.pid, signal.SIGKILL)
    for p in peers:
        p.process.join(1)


def _group(
    peers: list[Peer], weights: list[float], timeout_s: float = 5.0, codec: str = "none"
) -> AveragingGroup:
    members = tuple(
        GroupMember(p.descriptor.peer_id, p.descriptor.maddrs, w, 0.0 if p.descriptor.client_mode else 1.0)
        for p, w in zip(peers, weights, strict=True)
    )
    return AveragingGroup(f"test-{time.monotonic_ns()}", members, codec, timeout_s)


def test_weighted_mean_is_exact_and_bitwise_identical_on_every_peer(spawn_peers) -> None:  # type: ignore[no-untyped-def]
    peers = spawn_peers(4, [False, False, False, True])  # the last one is behind NAT (client mode)
    weights = [0.0, 100.0, 300.0, 50.0]  # the first is a receive-only replica, like the coordinator's
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(SIZE, generator=gen) for _ in peers]
    group = _group(peers, weights)
    for p, v, w in zip(peers, vectors, weights, strict=True):
        p.conn.send((group, v, w, "ok"))
    results = [_recv(p.conn) for p in peers]
    expected = sum(v * w for v, w in zip(vectors, weights, strict=True)) / sum(weights)
    for average, failed, _, _ in results:
        assert failed == 0
        assert torch.equal(average, results[0][0])
        torch.testing.assert_close(average, expected, atol=1e-6, rtol=1e-5)
    assert all(r[2] > 0 for r in results)


@pytest.mark.parametrize(("codec", "tolerance"), [("int8", 0.02), ("int4", 0.25)])
def test_compressed_averages_are_bitwise_identical_on_every_peer(  # type: ignore[no-untyped-def]
    spawn_peers, codec: str, tolerance: float
) -> None:
    peers = spawn_peers(4, [False, False, False, True])
    weights = [0.0, 100.0, 300.0, 50.0]
    gen = torch.Generator().manual_seed(1)
    vectors = [torch.randn(SIZE, generator=gen) * 0.01 for _ in peers]
    group = _group(peers, weights, codec=codec)
    for p, v, w in zip(peers, vectors, weights, strict=True):
        p.conn.send((group, v, w, "ok"))
    results = [_recv(p.conn) for p in peers]
    expected = sum(v * w for v, w in zip(vectors, weights, strict=True)) / sum(weights)
    for average, failed, _, _ in results:
        assert failed == 0
        assert torch.equal(average, results[0][0]), "every replica decodes the same bytes"
    error = float((results[0][0] - expected).norm() / expected.norm())
    assert 0 < error < tolerance, f"{codec} relative error {error:.4f}"
    # A peer moves (sends + receives) at most the whole vector four times over, compressed: its chunks
    # out, the averages back, and the same for the span it reduces; proto framing adds little.
    assert all(0 < r[2] <= 4 * encoded_size(codec, SIZE) * 1.01 for r in results)


def test_a_nan_contribution_is_refused_and_the_others_still_agree(spawn_peers) -> None:  # type: ignore[no-untyped-def]
    peers = spawn_peers(3)
    weights = [10.0, 20.0, 30.0]
    vectors = [torch.full((SIZE,), float(i + 1)) for i in range(3)]
    group = _group(peers, weights)
    behaviours = ["ok", "ok", "nan"]
    for p, v, w, b in zip(peers, vectors, weights, behaviours, strict=True):
        p.conn.send((group, v, w, b))
    results = [_recv(p.conn) for p in peers]
    honest = (1.0 * 10 + 2.0 * 20) / 30
    everyone = (1.0 * 10 + 2.0 * 20 + 3.0 * 30) / 60
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == 0 and results[1][1] == 0
    # The reducer of the span holding the NaN refuses that sender and averages the honest ones; the
    # other reducers saw only finite values from it. NaN reaches no replica.
    span0 = SIZE // 3
    expected = torch.full((SIZE,), everyone)
    expected[:span0] = honest
    for average, *_ in results[:2]:
        assert torch.isfinite(average).all()
    torch.testing.assert_close(results[0][0], expected)
    assert results[2][1] > 0  # the faulty peer learns its spans failed and must resync


def test_a_peer_that_dies_before_averaging_costs_one_timeout_not_a_stall(spawn_peers) -> None:  # type: ignore[no-untyped-def]
    peers = spawn_peers(3)
    timeout_s = 3.0
    weights = [1.0, 1.0, 1.0]
    vectors = [torch.full((SIZE,), float(i)) for i in range(3)]
    group = _group(peers, weights, timeout_s)
    for p, v, w, b in zip(peers, vectors, weights, ["ok", "ok", "die"], strict=True):
        p.conn.send((group, v, w, b))
    peers[2].process.join(10)
    assert peers[2].process.exitcode == 17
    results = [_recv(p.conn) for p in peers[:2]]
    a, b = results[0][0], results[1][0]
    assert torch.equal(a, b)  # survivors agree bitwise
    assert results[0][1] == results[1][1] == 1  # the dead peer's span failed for both
    values = set(a.unique().tolist())
    assert values == {0.0, 0.5}  # survivors' mean (0+1)/2, and 0 (no update) on the dead reducer's span
    assert max(r[3] for r in results) < 3 * timeout_s + 10
