"""The reducing side of the all-reduce: one session per group on the member that owns a span.

A session collects each sender's chunks, weights them by the tokens the coordinator assigned to that
sender, and finalizes every chunk exactly once: the average is encoded one time and those same bytes
answer every member. A sender that sends garbage (wrong size, NaN/Inf, a weight it was not given, the
same chunk twice) or goes silent for longer than the group's timeout is banned from the whole session,
so each chunk of a span averages the same set of senders whenever possible, and the round goes on
without it. (What a sender contributed before its ban stays in chunks already summed; keeping every
sender's chunk apart to undo that would cost memory per sender.)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import torch

from antorcha.averaging import codecs
from antorcha.averaging.base import AveragingGroup
from antorcha.averaging.spans import CHUNK_ELEMENTS, Span

log = logging.getLogger(__name__)


class RejectedContribution(ValueError):
    """A sender's chunk cannot be averaged; the reason says why."""


@dataclass(frozen=True)
class ChunkResult:
    payload: bytes  # encoded average; empty when no sender contributed
    total_weight: float
    contributors: int


class WeightedChunk:
    """Running weighted sum of one chunk. Pure: no clocks, no I/O."""

    def __init__(self, num_elements: int) -> None:
        self.sum = torch.zeros(num_elements, dtype=torch.float32)
        self.weight = 0.0
        self.senders: set[str] = set()

    def add(self, sender: str, values: torch.Tensor, weight: float) -> None:
        if sender in self.senders:
            raise RejectedContribution(f"{sender} already sent this chunk")
        if values.shape != self.sum.shape:
            raise RejectedContribution(f"chunk has {values.numel()} elements, expected {self.sum.numel()}")
        if not bool(torch.isfinite(values).all()):
            raise RejectedContribution("chunk holds NaN or Inf")
        self.sum.add_(torch.mul(values, weight))
        self.weight += weight
        self.senders.add(sender)

    def mean(self) -> torch.Tensor:
        return torch.div(self.sum, self.weight)


class ReduceSession:
    """Everything one reducer knows about one group's span."""

    def __init__(self, group: AveragingGroup, span: Span, now: float | None = None) -> None:
        self.group, self.span = group, span
        self.chunk_bounds = span.chunks(CHUNK_ELEMENTS)
        self.members = {m.peer_id for m in group.members}
        self.sender_weights = {m.peer_id: m.weight for m in group.members if m.weight > 0}
        self.chunks = [WeightedChunk(stop - start) for start, stop in self.chunk_bounds]
        self.results: list[ChunkResult | None] = [None] * len(self.chunks)
        self.ready = [asyncio.Event() for _ in self.chunks]
        self.banned: dict[str, str] = {}
        self.served: list[set[str]] = [set() for _ in self.chunks]
        self.fully_served = asyncio.Event()
        self.bytes_in = 0  # requests other members sent to this reducer
        self.bytes_out = 0  # answers this reducer sent them
        # A session given an explicit clock (simulations, tests) keeps to the latest time it was told.
        self._explicit_clock = now is not None
        self._now = time.monotonic() if now is None else now
        self.last_activity = dict.fromkeys(self.sender_weights, self._now)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.results)

    def contribute(self, sender: str, chunk: int, weight: float, payload: bytes, num_elements: int) -> None:
        if sender not in self.members:
            raise RejectedContribution(f"{sender} is not a member of group {self.group.group_id}")
        if not 0 <= chunk < len(self.chunks):
            raise RejectedContribution(f"chunk {chunk} out of range 0..{len(self.chunks) - 1}")
        if sender in self.banned:
            raise RejectedContribution(f"{sender} was excluded from this group: {self.banned[sender]}")
        expected = self.sender_weights.get(sender, 0.0)
        if not math.isclose(weight, expected, rel_tol=1e-9, abs_tol=1e-9):
            self.ban(sender, f"declared weight {weight} but the coordinator assigned {expected}")
            raise RejectedContribution(self.banned[sender])
        if expected == 0:
            return  # a receive-only member
        if self.results[chunk] is not None:
            raise RejectedContribution(f"chunk {chunk} was already finalized without {sender} (too late)")
        try:
            values = codecs.decode(self.group.codec, payload, num_elements)
            if num_elements != self.chunks[chunk].sum.numel():
                raise RejectedContribution(
                    f"chunk {chunk} has {num_elements} elements, expected {self.chunks[chunk].sum.numel()}"
                )
            self.chunks[chunk].add(sender, values, expected)
        except (codecs.CodecError, RejectedContribution) as e:
            self.ban(sender, str(e))
            raise RejectedContribution(str(e)) from None
        self.last_activity[sender] = self._now if self._explicit_clock else time.monotonic()
        self._maybe_finalize(chunk)

    def ban(self, sender: str, reason: str) -> None:
        if sender in self.banned:
            return
        self.banned[sender] = reason
        log.warning("excluded sender group=%s peer=%s reason=%s", self.group.group_id, sender, reason)
        for i in range(len(self.chunks)):
            self._maybe_finalize(i)

    def expire_silent_senders(self, now: float) -> None:
        """Ban senders that made no progress for the group's timeout and still owe chunks."""
        self._now = max(self._now, now)
        for sender, last in self.last_activity.items():
            if sender in self.banned:
                continue
            owes = any(
                r is None and sender not in c.senders for r, c in zip(self.results, self.chunks, strict=True)
            )
            if owes and now - last > self.group.timeout_s:
                self.ban(sender, f"sent nothing for {self.group.timeout_s:.1f}s")

    def _maybe_finalize(self, i: int) -> None:
        if self.results[i] is not None:
            return
        waiting_for = set(self.sender_weights) - set(self.banned) - self.chunks[i].senders
        if waiting_for:
            return
        chunk = self.chunks[i]
        payload = codecs.encode(self.group.codec, chunk.mean()) if chunk.weight > 0 else b""
        self.results[i] = ChunkResult(payload, chunk.weight, len(chunk.senders))
        chunk.sum = torch.zeros(0)  # the accumulator is no longer needed; keep memory flat
        self.ready[i].set()

    async def result(self, chunk: int, timeout: float) -> ChunkResult:
        await asyncio.wait_for(self.ready[chunk].wait(), timeout)
        result = self.results[chunk]
        assert result is not None
        return result

    def mark_served(self, member: str, chunk: int) -> None:
        """A member got the result of a chunk; once all have every chunk the session may end."""
        self.served[chunk].add(member)
        expected = self.members - set(self.banned)  # a banned member may never come back for results
        if all(expected <= s for s in self.served):
            self.fully_served.set()

    async def watch(self, interval: float = 0.1) -> None:
        """Run until every chunk is final, banning silent senders as their time runs out."""
        while not self.done:
            await asyncio.sleep(interval)
            self.expire_silent_senders(time.monotonic())
