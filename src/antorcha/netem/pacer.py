"""Application-level slow link: ``LinkPacer`` delays sends and receives as a link of a given
bandwidth and round-trip time would, for machines where the kernel lab (``lab.py``) cannot run.

Pure asyncio and no antorcha imports beyond ``netem``, so a data-plane transport can wrap its calls::

    await pacer.send(len(request))      # our uplink carries the request
    await pacer.round_trip()            # propagation there and back
    await pacer.receive(len(response))  # our downlink carries the response

Upload and download are separate token buckets (a link is full duplex). A bucket refills at the
link's byte rate up to ``burst_bytes``; a call takes its bytes at once, possibly going into debt,
and waits until the debt is repaid. Taking the bytes before waiting makes concurrent callers queue
in call order and share the rate instead of each seeing the whole link. A cancelled call keeps its
reservation: those bytes are treated as already on the wire.
"""

from __future__ import annotations

import asyncio
import math
import operator
import time
from collections.abc import Awaitable, Callable

from antorcha.netem.links import LinkSpec

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


def _positive_finite(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return float(value)


def _byte_count(nbytes: object, name: str = "nbytes") -> int:
    if isinstance(nbytes, bool):
        raise TypeError(f"{name} must be an integer byte count, got bool")
    try:
        n = operator.index(nbytes)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{name} must be an integer byte count, got {type(nbytes).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


class TokenBucket:
    """Bytes at ``rate`` per second with up to ``capacity`` saved while idle; the clock is passed in."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` now; return how long until they have passed (0 if the bucket had them)."""
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)
        self.tokens -= nbytes
        return max(0.0, -self.tokens / self.rate)


class LinkPacer:
    """One node's link: ``bandwidth_bps`` bits per second each way, ``rtt_s`` seconds round trip."""

    def __init__(
        self,
        bandwidth_bps: float,
        rtt_s: float,
        *,
        burst_bytes: int = 0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.bandwidth_bps = _positive_finite("bandwidth_bps", bandwidth_bps, allow_zero=False)
        self.rtt_s = _positive_finite("rtt_s", rtt_s, allow_zero=True)
        burst = _byte_count(burst_bytes, "burst_bytes")
        if not callable(clock) or not callable(sleep):
            raise TypeError("clock and sleep must be callables: clock() -> seconds, await sleep(seconds)")
        self._clock = clock
        self._sleep = sleep
        now = clock()
        rate = self.bandwidth_bps / 8
        self._up = TokenBucket(rate, burst, now)
        self._down = TokenBucket(rate, burst, now)
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    def from_spec(
        cls,
        spec: LinkSpec,
        *,
        burst_bytes: int = 0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> LinkPacer:
        return cls(spec.bandwidth_bps, spec.rtt_s, burst_bytes=burst_bytes, clock=clock, sleep=sleep)

    async def send(self, nbytes: int) -> None:
        """Wait until our uplink could have carried ``nbytes`` more."""
        n = _byte_count(nbytes)
        self.bytes_sent += n
        await self._wait(self._up.reserve(n, self._clock()))

    async def receive(self, nbytes: int) -> None:
        """Wait until our downlink could have carried ``nbytes`` more."""
        n = _byte_count(nbytes)
        self.bytes_received += n
        await self._wait(self._down.reserve(n, self._clock()))

    async def round_trip(self) -> None:
        await self._wait(self.rtt_s)

    async def one_way(self) -> None:
        await self._wait(self.rtt_s / 2)

    async def _wait(self, seconds: float) -> None:
        if seconds > 0:
            await self._sleep(seconds)
