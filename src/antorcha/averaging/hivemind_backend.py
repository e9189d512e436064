"""The hivemind data plane: a hivemind DHT peer and a coordinator-driven all-reduce over its libp2p daemon.

hivemind's own matchmaking forms whatever group it finds in time and returns deltas that each peer
adds to its own values, so replicas drift apart by rounding. Here the coordinator fixes the group, and
each span's reducer sends every member the same encoded average (see `reducer`), so replicas stay
bitwise identical. hivemind provides the peer-to-peer transport: NAT traversal, relays and client mode.

The backend owns one background thread running an asyncio loop; `all_reduce` is called from the
training thread and blocks only that thread, at the round boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import hivemind
import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.utils.multiaddr import Multiaddr

from antorcha.averaging import codecs
from antorcha.averaging.base import AllReduceResult, AveragingGroup, PeerDescriptor
from antorcha.averaging.reducer import ReduceSession, RejectedContribution
from antorcha.averaging.robust import AggregationPolicy
from antorcha.averaging.spans import span_layout
from antorcha.netem.pacer import LinkPacer
from antorcha.proto.antorcha.v1 import averaging_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

HANDLER_NAME = "antorcha.v1.ReducePart"
_MAX_SESSIONS = 8  # groups whose results stay available to late members
_CONCURRENT_CALLS_PER_PEER = 4
_DELIVERY_GRACE_S = 1.0
_PR_SET_PDEATHSIG = 1


class _ParentBoundDHT(hivemind.DHT):
    """A DHT process, with the p2pd daemon it starts, that dies with the process that created it.

    Otherwise a `kill -9` of a worker leaves its DHT process and p2pd running: peers can still open
    streams to the dead worker's handler and hang until their timeout instead of failing at once, and
    the volunteer's machine keeps two orphans.
    """

    def run(self) -> None:
        _die_with_parent(self._creator_pid)
        super().run()

    def start(self) -> None:
        self._creator_pid = os.getpid()  # set before the fork, read in the child
        super().start()


def _die_with_parent(creator_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    os.setpgrp()  # our own group, so that p2pd (started next) can be taken down with us
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # The parent died before prctl took effect. (Compare with the creator's pid, not 1: in a container
    # the creator may itself be pid 1.)
    if os.getppid() != creator_pid:
        os.killpg(0, signal.SIGKILL)


class HivemindBackend:
    def __init__(
        self,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        client_mode: bool = False,
        identity_path: str | None = None,
        start_timeout_s: float = 60.0,
        pacer: LinkPacer | None = None,
    ) -> None:
        """`pacer` emulates a slow link in the application (bandwidth and latency of each exchange)
        where the kernel cannot shape one (see antorcha.netem)."""
        # The DHT forks its own process: start it before any thread exists in this one.
        self.dht = _ParentBoundDHT(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) or None,
            client_mode=client_mode,
            identity_path=identity_path,
            start=True,
            await_ready=True,
        )
        self.client_mode = client_mode
        self.pacer = pacer
        visible = [] if client_mode else [str(m) for m in self.dht.get_visible_maddrs()]
        self._peer = PeerDescriptor(self.dht.peer_id.to_base58(), tuple(visible), client_mode)
        self._sessions: OrderedDict[str, asyncio.Future[ReduceSession]] = OrderedDict()
        # Trust: how our reducer aggregates (the run spec's; set once joined), a hook that sees each new
        # session before it serves anyone (the coordinator keeps contributions for spot checks), and a
        # fault-injection hook that rewrites each chunk we send (tests of the reducers' checks only).
        self.policy = AggregationPolicy()
        self.session_hook: Callable[[ReduceSession], None] | None = None
        self.tamper_chunk: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.total_bytes = 0
        self._connected: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="data-plane", daemon=True)
        self._thread.start()
        self._p2p: P2P = self._run(self._start(), start_timeout_s)

    @property
    def peer(self) -> PeerDescriptor:
        return self._peer

    def bootstrap_maddrs(self) -> list[str]:
        """Multiaddrs (with /p2p/ id) that others pass as initial peers."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    async def _start(self) -> P2P:
        p2p = await self.dht.replicate_p2p()
        if not self.client_mode:
            await p2p.add_protobuf_handler(HANDLER_NAME, self._handle, pb.ReducePartRequest)
        return p2p

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---- reducing side -------------------------------------------------------------------------

    def _session_future(self, group_id: str) -> asyncio.Future[ReduceSession]:
        fut = self._sessions.get(group_id)
        if fut is None:
            fut = self._loop.create_future()
            self._sessions[group_id] = fut
            while len(self._sessions) > _MAX_SESSIONS:
                _, old = self._sessions.popitem(last=False)
                if not old.done():
                    old.cancel()
        return fut

    async def _handle(self, request: pb.ReducePartRequest, context: P2PContext) -> pb.ReducePartResponse:
        if self.pacer is not None:
            await self.pacer.receive(request.ByteSize())
        response = await self._reduce(context.remote_id.to_base58(), request)
        if self.pacer is not None:
            await self.pacer.send(response.ByteSize())
        fut = self._sessions.get(request.group_id)
        if fut is not None and fut.done() and not fut.cancelled():
            session = fut.result()
            session.bytes_in += request.ByteSize()
            session.bytes_out += response.ByteSize()
        return response

    async def _reduce(self, sender: str, request: pb.ReducePartRequest) -> pb.ReducePartResponse:
        fut = self._session_future(request.group_id)
        try:
            # A member may be told of the group a moment before this reducer is; wait for it.
            session = await asyncio.wait_for(asyncio.shield(fut), timeout=30.0)
        except (TimeoutError, asyncio.CancelledError):
            return pb.ReducePartResponse(status=pb.REDUCE_UNKNOWN_GROUP, reason="group unknown to this peer")
        if sender not in session.members:
            return pb.ReducePartResponse(status=pb.REDUCE_NOT_A_MEMBER, reason=f"{sender} not in the group")
        if not 0 <= request.chunk < len(session.chunks):
            return pb.ReducePartResponse(status=pb.REDUCE_REJECTED, reason=f"no chunk {request.chunk}")
        try:
            session.contribute(sender, request.chunk, request.weight, request.payload, request.num_elements)
        except RejectedContribution as e:
            session.mark_served(sender, request.chunk)  # answered; it will not come back for this chunk
            return pb.ReducePartResponse(status=pb.REDUCE_REJECTED, reason=str(e))
        try:
            result = await session.result(request.chunk, timeout=3 * session.group.timeout_s)
        except TimeoutError:
            return pb.ReducePartResponse(status=pb.REDUCE_REJECTED, reason="chunk was never finalized")
        session.mark_served(sender, request.chunk)
        if not result.payload:
            return pb.ReducePartResponse(status=pb.REDUCE_NO_CONTRIBUTORS, reason="every sender failed")
        return pb.ReducePartResponse(
            status=pb.REDUCE_OK,
            payload=result.payload,
            total_weight=result.total_weight,
            contributors=result.contributors,
        )

    # ---- sending side --------------------------------------------------------------------------

    def all_reduce(
        self,
        group: AveragingGroup,
        vector: torch.Tensor,
        weight: float,
        on_exchange: Callable[[], object] | None = None,
    ) -> AllReduceResult:
        """`on_exchange` is called after each chunk exchange (fault injection, progress)."""
        flat = vector.detach().to("cpu", torch.float32)
        return self._run(self._all_reduce(group, flat, weight, on_exchange), None)

    async def _all_reduce(
        self,
        group: AveragingGroup,
        vector: torch.Tensor,
        weight: float,
        on_exchange: Callable[[], object] | None,
    ) -> AllReduceResult:
        start = time.monotonic()
        me = self._peer.peer_id
        spans = span_layout(vector.numel(), group)
        mine = next((s for s in spans if group.members[s.member_index].peer_id == me), None)
        watcher = None
        if mine is not None and mine.length > 0:
            session = ReduceSession(group, mine, policy=self.policy)
            if self.session_hook is not None:
                self.session_hook(session)
            fut = self._session_future(group.group_id)
            if not fut.done():
                fut.set_result(session)
            watcher = asyncio.create_task(session.watch())
        result = AllReduceResult(average=torch.zeros_like(vector), sent=vector.clone())
        failed: set[int] = set()
        limits = {m.peer_id: asyncio.Semaphore(_CONCURRENT_CALLS_PER_PEER) for m in group.members}

        async def exchange(span_index: int, chunk: int, lo: int, hi: int) -> None:
            member = group.members[spans[span_index].member_index]
            values = vector[lo:hi] if self.tamper_chunk is None else self.tamper_chunk(vector[lo:hi])
            payload = codecs.encode(group.codec, values) if weight > 0 else b""
            if payload and group.codec in codecs.LOSSY and values.numel() == hi - lo:
                assert result.sent is not None
                result.sent[lo:hi] = codecs.decode(group.codec, payload, hi - lo)
            request = pb.ReducePartRequest(
                group_id=group.group_id,
                chunk=chunk,
                weight=weight,
                payload=payload,
                num_elements=values.numel(),
            )
            async with limits[member.peer_id]:
                if member.peer_id == me:
                    response = await self._reduce(me, request)
                else:
                    response = await self._call(member.peer_id, member.maddrs, request, group.timeout_s)
                    result.bytes_sent += request.ByteSize()
                    result.bytes_received += response.ByteSize()
            if on_exchange is not None:
                on_exchange()
            if response.status == pb.REDUCE_OK:
                result.average[lo:hi] = codecs.decode(group.codec, response.payload, hi - lo)
                result.contributors[span_index] = response.contributors
            elif response.status == pb.REDUCE_NO_CONTRIBUTORS:
                result.contributors[span_index] = 0
            else:
                raise RejectedContribution(f"{pb.ReduceStatus.Name(response.status)}: {response.reason}")

        async def reduce_span(span_index: int) -> None:
            span = spans[span_index]
            try:
                await asyncio.gather(
                    *(exchange(span_index, c, lo, hi) for c, (lo, hi) in enumerate(span.chunks()))
                )
            except Exception as e:  # a dead or misbehaving reducer: its span gets no update this round
                log.warning(
                    "span failed group=%s reducer=%s reason=%r",
                    group.group_id,
                    group.members[span.member_index].peer_id,
                    e,
                )
                failed.add(span_index)
                result.average[span.start : span.stop] = 0

        await asyncio.gather(*(reduce_span(i) for i, s in enumerate(spans) if s.length > 0))
        if watcher is not None:
            # Keep banning silent senders for others' sake until our span is final, then stop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(watcher), timeout=3 * group.timeout_s)
            watcher.cancel()
        if mine is not None and mine.length > 0:
            # What our span's reducer moved for the others (answers still in flight are not counted).
            result.bytes_sent += session.bytes_out
            result.bytes_received += session.bytes_in
        result.failed_spans = len(failed)
        result.seconds = time.monotonic() - start
        self.total_bytes += result.bytes_total
        return result

    async def _call(
        self, peer_id: str, maddrs: Sequence[str], request: pb.ReducePartRequest, timeout_s: float
    ) -> pb.ReducePartResponse:
        pid = PeerID.from_base58(peer_id)
        if maddrs and peer_id not in self._connected:
            # p2pd wants transport addresses without the trailing /p2p/<id>.
            suffix = Multiaddr(f"/p2p/{peer_id}")
            addrs = [
                Multiaddr(m).decapsulate(suffix) if m.endswith(f"/p2p/{peer_id}") else Multiaddr(m)
                for m in maddrs
            ]
            try:
                await self._p2p._client.connect(pid, addrs)
                self._connected.add(peer_id)
            except Exception as e:  # maybe still reachable through a relay or the DHT; the call will tell
                log.debug("direct connect failed peer=%s reason=%r", peer_id, e)
        if self.pacer is not None:
            await self.pacer.send(request.ByteSize())
            await self.pacer.round_trip()
        response = await asyncio.wait_for(
            self._p2p.call_protobuf_handler(pid, HANDLER_NAME, request, pb.ReducePartResponse),
            timeout=3 * timeout_s + 5,
        )
        if self.pacer is not None:
            await self.pacer.receive(response.ByteSize())
        return response

    async def _drain(self, timeout_s: float) -> None:
        """Let members that are still fetching our spans' results finish before we go away."""
        pending = [
            f.result().fully_served.wait()
            for f in self._sessions.values()
            if f.done() and not f.cancelled() and not f.result().fully_served.is_set()
        ]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), timeout_s)
        # A result counts as served when our handler returns it; p2pd still has to deliver the bytes.
        await asyncio.sleep(_DELIVERY_GRACE_S)

    async def _shutdown(self) -> None:
        await self._drain(timeout_s=10.0)
        if not self.client_mode:
            with contextlib.suppress(Exception):
                await self._p2p.remove_protobuf_handler(HANDLER_NAME)
        await self._p2p.shutdown()  # a replica: closes our connections, leaves the DHT's daemon to it
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self._shutdown(), 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        with contextlib.suppress(Exception):
            self.dht.shutdown()
