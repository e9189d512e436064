"""LinkPacer on a virtual clock: exact byte/time accounting, shared buckets, RTT, refused arguments."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Awaitable, Callable

import pytest

from antorcha.netem.links import LinkSpec
from antorcha.netem.pacer import LinkPacer, TokenBucket

MB_PER_S = 8e6  # bits per second for exactly 1 000 000 bytes per second


class VirtualTime:
    """A clock that only moves when every task is waiting: sleeps wake in order of their deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + seconds, next(self._seq), fut))
        await fut

    def pacer(self, bandwidth_bps: float = MB_PER_S, rtt_s: float = 0.1, **kwargs: int) -> LinkPacer:
        return LinkPacer(bandwidth_bps, rtt_s, clock=self.clock, sleep=self.sleep, **kwargs)

    async def run(self, *calls: Callable[[], Awaitable[object]]) -> list[float]:
        """Run the calls concurrently; return the virtual time at which each finished."""
        finished: list[float] = [math.nan] * len(calls)

        async def timed(i: int, call: Callable[[], Awaitable[object]]) -> None:
            await call()
            finished[i] = self.now

        tasks = [asyncio.create_task(timed(i, c)) for i, c in enumerate(calls)]
        while not all(t.done() for t in tasks):
            for _ in range(10):  # let every task run up to its next sleep
                await asyncio.sleep(0)
            if self._timers:
                when, _, fut = heapq.heappop(self._timers)
                if not fut.done():  # a cancelled sleeper's timer just lapses
                    self.now = max(self.now, when)
                    fut.set_result(None)
        for t in tasks:
            t.result()
        return finished


def run(coro: Awaitable[list[float]]) -> list[float]:
    async def main() -> list[float]:
        return await coro

    return asyncio.run(main())


def test_send_takes_bytes_over_rate_exactly() -> None:
    vt = VirtualTime()
    pacer = vt.pacer()
    assert run(vt.run(lambda: pacer.send(250_000))) == [0.25]
    assert run(vt.run(lambda: pacer.send(500_000))) == [0.75]
    assert vt.sleeps == [0.25, 0.5]
    assert pacer.bytes_sent == 750_000
    assert pacer.bytes_received == 0


def test_upload_and_download_are_separate_buckets() -> None:
    vt = VirtualTime()
    pacer = vt.pacer()
    done = run(vt.run(lambda: pacer.send(1_000_000), lambda: pacer.receive(1_000_000)))
    assert done == [1.0, 1.0]  # full duplex: neither waits for the other
    assert (pacer.bytes_sent, pacer.bytes_received) == (1_000_000, 1_000_000)


def test_concurrent_senders_share_the_bucket_in_call_order() -> None:
    vt = VirtualTime()
    pacer = vt.pacer()
    done = run(vt.run(*[lambda: pacer.send(250_000) for _ in range(4)]))
    assert done == [0.25, 0.5, 0.75, 1.0]  # together: 1 MB at 1 MB/s, not four times the rate


def test_receivers_share_their_bucket_too() -> None:
    vt = VirtualTime()
    pacer = vt.pacer(bandwidth_bps=80e6)  # 10 MB/s
    done = run(vt.run(lambda: pacer.receive(5_000_000), lambda: pacer.receive(5_000_000)))
    assert done == [0.5, 1.0]


def test_no_credit_saved_while_idle_without_burst() -> None:
    vt = VirtualTime()
    pacer = vt.pacer()
    run(vt.run(lambda: pacer.send(250_000)))
    vt.now = 100.0
    assert run(vt.run(lambda: pacer.send(250_000))) == [100.25]


def test_burst_lets_an_idle_link_send_at_once_then_paces() -> None:
    vt = VirtualTime()
    pacer = vt.pacer(burst_bytes=100_000)
    done = run(vt.run(lambda: pacer.send(100_000)))
    assert done == [0.0]
    assert vt.sleeps == []
    assert run(vt.run(lambda: pacer.send(100_000))) == [0.1]
    vt.now = 10.0  # long idle: the bucket refills only up to the burst
    assert run(vt.run(lambda: pacer.send(300_000))) == [10.2]


def test_round_trip_and_one_way_wait_the_rtt() -> None:
    vt = VirtualTime()
    pacer = vt.pacer(rtt_s=0.08)
    assert run(vt.run(pacer.round_trip)) == [0.08]
    assert run(vt.run(pacer.one_way)) == [0.12]
    zero = vt.pacer(rtt_s=0)
    sleeps = len(vt.sleeps)
    run(vt.run(zero.round_trip, lambda: zero.send(0)))
    assert len(vt.sleeps) == sleeps  # nothing to wait for: no sleep call at all


def test_request_response_composition() -> None:
    vt = VirtualTime()
    pacer = vt.pacer(rtt_s=0.1)

    async def call() -> None:
        await pacer.send(100_000)
        await pacer.round_trip()
        await pacer.receive(200_000)

    assert run(vt.run(call)) == [pytest.approx(0.4)]


def test_cancelled_send_keeps_its_reservation() -> None:
    vt = VirtualTime()
    pacer = vt.pacer()

    async def scenario() -> list[float]:
        first = asyncio.create_task(pacer.send(500_000))
        await asyncio.sleep(0)
        first.cancel()
        return await vt.run(lambda: pacer.send(500_000))

    assert run(scenario()) == [1.0]  # the cancelled bytes were already on the wire


def test_from_spec_and_real_clock_defaults() -> None:
    pacer = LinkPacer.from_spec(LinkSpec(1000, 0))
    assert pacer.bandwidth_bps == 1e9
    assert pacer.rtt_s == 0

    async def tiny() -> None:
        await pacer.send(1000)
        await pacer.receive(1000)
        await pacer.round_trip()

    asyncio.run(tiny())
    assert (pacer.bytes_sent, pacer.bytes_received) == (1000, 1000)


def test_token_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1000.0, capacity=0.0, now=10.0)
    assert bucket.reserve(500, now=10.0) == 0.5
    assert bucket.reserve(500, now=9.0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bandwidth_bps": 0}, ValueError, "bandwidth_bps must be finite and > 0"),
        ({"bandwidth_bps": -1}, ValueError, "bandwidth_bps must be finite and > 0"),
        ({"bandwidth_bps": math.inf}, ValueError, "bandwidth_bps must be finite"),
        ({"bandwidth_bps": math.nan}, ValueError, "bandwidth_bps must be finite"),
        ({"bandwidth_bps": "100mbit"}, TypeError, "bandwidth_bps must be a number"),
        ({"bandwidth_bps": True}, TypeError, "bandwidth_bps must be a number"),
        ({"rtt_s": -0.1}, ValueError, "rtt_s must be finite and >= 0"),
        ({"rtt_s": None}, TypeError, "rtt_s must be a number"),
        ({"burst_bytes": -1}, ValueError, "burst_bytes must be >= 0"),
        ({"burst_bytes": 1.5}, TypeError, "burst_bytes must be an integer"),
        ({"clock": 3.0}, TypeError, "clock and sleep must be callables"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    args: dict[str, object] = {"bandwidth_bps": 1e6, "rtt_s": 0.0, **kwargs}
    with pytest.raises(error, match=message):
        LinkPacer(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("nbytes", "error", "message"),
    [
        (-1, ValueError, "nbytes must be >= 0"),
        (1.5, TypeError, "nbytes must be an integer byte count, got float"),
        (True, TypeError, "got bool"),
        ("10", TypeError, "got str"),
    ],
)
def test_bad_byte_counts_are_refused(nbytes: object, error: type[Exception], message: str) -> None:
    pacer = LinkPacer(1e6, 0.0)

    async def both() -> None:
        with pytest.raises(error, match=message):
            await pacer.send(nbytes)  # type: ignore[arg-type]
        with pytest.raises(error, match=message):
            await pacer.receive(nbytes)  # type: ignore[arg-type]

    asyncio.run(both())
    assert (pacer.bytes_sent, pacer.bytes_received) == (0, 0)
