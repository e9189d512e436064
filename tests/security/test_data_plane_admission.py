"""Data-plane admission with real hivemind peers, each in its own process: a peer the coordinator did
not put in the round's group (here it even knows the group id, the worst case) sends contributions to
every reducer of the group. Each reducer answers REDUCE_NOT_A_MEMBER, and the members' average is the
weighted mean of the members alone, identical on every member."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection

import pytest
import torch

from antorcha.averaging.base import AveragingGroup, GroupMember

pytestmark = pytest.mark.slow
SIZE = 50_000


def _peer_main(conn: Connection, initial_peers: list[str], role: str) -> None:
    os.setsid()  # own process group: teardown reaps the DHT process and p2pd
    from antorcha.averaging import codecs
    from antorcha.averaging.hivemind_backend import HivemindBackend
    from antorcha.averaging.spans import span_layout
    from antorcha.proto.antorcha.v1 import averaging_pb2 as apb

    backend = HivemindBackend(initial_peers=initial_peers)
    conn.send((backend.peer, backend.bootstrap_maddrs()))
    group, vector, weight = conn.recv()
    if role == "member":
        result = backend.all_reduce(group, vector, weight)
        conn.send((result.average, result.failed_spans))
    else:  # the rogue: not a member, pushes a huge contribution to every reducer
        answers = []
        for span in span_layout(SIZE, group):
            member = group.members[span.member_index]
            if span.length == 0:
                continue
            values = torch.full((span.length,), 1e6)
            request = apb.ReducePartRequest(
                group_id=group.group_id,
                chunk=0,
                weight=10_000.0,
                payload=codecs.encode(group.codec, values),
                num_elements=span.length,
            )
            response = backend._run(backend._call(member.peer_id, member.maddrs, request, 30.0), 60)
            answers.append((response.status, response.reason))
        conn.send(answers)
    time.sleep(2)  # let the others finish talking to us before we go
    backend.close()


def _recv(conn: Connection, timeout_s: float = 120.0) -> object:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"peer process said nothing for {timeout_s}s")
    return conn.recv()


def test_unadmitted_peer_is_refused_by_every_reducer() -> None:
    from antorcha.proto.antorcha.v1 import averaging_pb2 as apb

    ctx = mp.get_context("spawn")
    procs, conns, descriptors = [], [], []
    try:
        bootstrap: list[str] = []
        for role in ("member", "member", "rogue"):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_peer_main, args=(child, bootstrap, role))
            proc.start()
            descriptor, maddrs = _recv(conn)  # type: ignore[misc]
            bootstrap = bootstrap or list(maddrs)
            procs.append(proc)
            conns.append(conn)
            descriptors.append(descriptor)
        weights = [100.0, 300.0]
        members = tuple(
            GroupMember(d.peer_id, d.maddrs, w, 1.0) for d, w in zip(descriptors[:2], weights, strict=True)
        )
        group = AveragingGroup(f"admission-{time.monotonic_ns()}", members, "none", 10.0)
        vectors = [torch.full((SIZE,), 1.0), torch.full((SIZE,), 3.0)]
        conns[2].send((group, torch.zeros(SIZE), 0.0))
        time.sleep(0.5)  # the rogue knocks first, while the reducers wait for the members
        for conn, vector, weight in zip(conns[:2], vectors, weights, strict=True):
            conn.send((group, vector, weight))
        answers = _recv(conns[2])
        results = [_recv(c) for c in conns[:2]]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join(5)
    assert answers and all(status == apb.REDUCE_NOT_A_MEMBER for status, _ in answers), answers  # type: ignore[union-attr]
    expected = torch.full((SIZE,), (100.0 * 1.0 + 300.0 * 3.0) / 400.0)
    for average, failed in results:  # type: ignore[misc]
        assert failed == 0
        torch.testing.assert_close(average, expected)
    assert torch.equal(results[0][0], results[1][0])  # type: ignore[index]
