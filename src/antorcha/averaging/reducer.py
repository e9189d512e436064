"""The reducing side of the all-reduce: one session per group on the member that owns a span.

A session collects each sender's chunks, weights them by the tokens the coordinator assigned to that
sender, and finalizes every chunk exactly once: the average is encoded one time and those same bytes
answer every member. A sender that sends garbage (wrong size, NaN/Inf, a weight it was not given, the
same chunk twice) or goes silent for longer than the group's timeout is banned from the whole session,
so each chunk of a span averages the same set of senders whenever possible, and the round goes on
without it. (With the plain mean, what a sender contributed before its ban stays in chunks already
summed; keeping every sender's chunk apart to undo that would cost memory per sender.)

Trust (`AggregationPolicy`, see `robust`): with a robust aggregation or a norm-outlier bound the
session keeps each sender's chunk apart until the chunk finalizes (memory: senders × span), leaves
out senders whose chunk norm is an outlier (banning them from the rest of the session) and senders
banned for any reason before the chunk finalized, and aggregates the rest by the policy. Every
session measures what each sender actually sent (its squared norm over the span), so the
coordinator's reducer can judge real contributions rather than norms the workers declare.
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
from antorcha.averaging.robust import AggregationPolicy, aggregate, exceeds_declared, norm_outliers
from antorcha.averaging.spans import CHUNK_ELEMENTS, Span
from antorcha.diloco.pseudo_gradient import all_finite

log = logging.getLogger(__name__)


class RejectedContribution(ValueError):
    """A sender's chunk cannot be averaged; the reason says why."""


@dataclass(frozen=True)
class ChunkResult:
    payload: bytes  # encoded average; empty when no sender contributed
    total_weight: float
    contributors: int


class WeightedChunk:
    """Running weighted sum of one chunk, or (`keep_apart`) each sender's values until the chunk is
    aggregated. Pure: no clocks, no I/O."""

    def __init__(self, num_elements: int, keep_apart: bool = False) -> None:
        self.sum = torch.zeros(num_elements, dtype=torch.float32)
        self.num_elements = num_elements
        self.weight = 0.0
        self.senders: set[str] = set()
        self.kept: dict[str, tuple[torch.Tensor, float]] | None = {} if keep_apart else None

    def add(self, sender: str, values: torch.Tensor, weight: float) -> None:
        if sender in self.senders:
            raise RejectedContribution(f"{sender} already sent this chunk")
        if values.numel() != self.num_elements or values.dim() != 1:
            raise RejectedContribution(f"chunk has {values.numel()} elements, expected {self.num_elements}")
        if not all_finite(values):
            raise RejectedContribution("chunk holds NaN or Inf")
        if self.kept is not None:
            self.kept[sender] = (values, weight)
        else:
            self.sum.add_(torch.mul(values, weight))
        self.weight += weight
        self.senders.add(sender)

    def mean(self) -> torch.Tensor:
        return torch.div(self.sum, self.weight)

    def drop(self, sender: str) -> None:
        """Leave a kept sender out of the aggregate (only possible while senders are kept apart)."""
        if self.kept is not None and sender in self.kept:
            _, weight = self.kept.pop(sender)
            self.weight -= weight

    def aggregate(self, policy: AggregationPolicy) -> torch.Tensor:
        if self.kept is None:
            return self.mean()
        senders = sorted(self.kept)  # a fixed order: the same inputs give the same bits
        return aggregate(policy, [self.kept[s][0] for s in senders], [self.kept[s][1] for s in senders])


class ReduceSession:
    """Everything one reducer knows about one group's span."""

    def __init__(
        self,
        group: AveragingGroup,
        span: Span,
        now: float | None = None,
        policy: AggregationPolicy | None = None,
        keep_contributions: bool = False,
    ) -> None:
        """`keep_contributions`: also keep every sender's whole span after finalizing (the coordinator's
        spot checks read them from `contributions`)."""
        self.group, self.span = group, span
        self.policy = policy or AggregationPolicy()
        self.chunk_bounds = span.chunks(CHUNK_ELEMENTS)
        self.members = {m.peer_id for m in group.members}
        self.sender_weights = {m.peer_id: m.weight for m in group.members if m.weight > 0}
        keep_apart = self.policy.keeps_senders_apart or keep_contributions
        self.chunks = [WeightedChunk(stop - start, keep_apart) for start, stop in self.chunk_bounds]
        self.measured_sq_norms: dict[str, float] = {}  # sender -> squared norm of what it sent here
        self.outliers: dict[str, str] = {}  # senders left out for their norm, with the reason
        # Norms the senders declared for their whole Δ (set by the coordinator, which knows them): a
        # sender whose span here measures larger than that lied, and is left out of this span.
        self.declared_norms: dict[str, float] = {}
        self.contributions: dict[str, torch.Tensor] | None = (
            {s: torch.zeros(span.length) for s in self.sender_weights} if keep_contributions else None
        )
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

    def keep_contributions(self) -> None:
        """Keep every sender's whole span in `contributions` (call before the session serves anyone)."""
        if self.contributions is None:
            self.contributions = {s: torch.zeros(self.span.length) for s in self.sender_weights}
            for chunk in self.chunks:
                if chunk.kept is None and not chunk.senders:
                    chunk.kept = {}

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
            if num_elements != self.chunks[chunk].num_elements:
                raise RejectedContribution(
                    f"chunk {chunk} has {num_elements} elements, expected {self.chunks[chunk].num_elements}"
                )
            sq_norm = float(torch.dot(values, values)) if values.dim() == 1 else 0.0
            measured = self.measured_sq_norms.get(sender, 0.0) + sq_norm
            declared = self.declared_norms.get(sender, 0.0)
            if exceeds_declared(math.sqrt(measured), declared):
                self.outliers[sender] = (
                    f"its span measures norm {math.sqrt(measured):.4g}, above the {declared:.4g} it declared"
                )
                raise RejectedContribution(self.outliers[sender])
            self.chunks[chunk].add(sender, values, expected)
            self.measured_sq_norms[sender] = measured
            if self.contributions is not None:
                lo = self.chunk_bounds[chunk][0] - self.span.start
                self.contributions[sender][lo : lo + values.numel()] = values
        except (codecs.CodecError, RejectedContribution) as e:
            self.ban(sender, str(e))
            raise RejectedContribution(str(e)) from None
        self.last_activity[sender] = self._now if self._explicit_clock else time.monotonic()
        self._maybe_finalize(chunk)

    def ban(self, sender: str, reason: str) -> None:
        if sender in self.banned:
            return
        self._ban_quietly(sender, reason)
        for i in range(len(self.chunks)):
            self._maybe_finalize(i)

    def _ban_quietly(self, sender: str, reason: str) -> None:
        """Ban without finalizing other chunks (for use while a chunk is being finalized)."""
        self.banned[sender] = reason
        log.warning("excluded sender group=%s peer=%s reason=%s", self.group.group_id, sender, reason)

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
        newly_banned = False
        if chunk.kept is not None:
            for sender in [s for s in chunk.kept if s in self.banned]:
                chunk.drop(sender)  # banned (e.g. NaN in another chunk) after sending this one
            norms = {s: float(torch.linalg.vector_norm(v)) for s, (v, _) in chunk.kept.items()}
            for sender, reason in norm_outliers(norms, self.policy.norm_outlier_k).items():
                self.outliers[sender] = reason
                self._ban_quietly(sender, reason)
                chunk.drop(sender)
                newly_banned = True
        contributors = len(chunk.kept) if chunk.kept is not None else len(chunk.senders)
        weight = chunk.weight if contributors else 0.0
        payload = codecs.encode(self.group.codec, chunk.aggregate(self.policy)) if weight > 0 else b""
        self.results[i] = ChunkResult(payload, weight, contributors)
        chunk.sum, chunk.kept = torch.zeros(0), None  # the accumulators are no longer needed
        self.ready[i].set()
        if newly_banned:  # chunks waiting on the outlier's other parts can finalize now
            for j in range(len(self.chunks)):
                self._maybe_finalize(j)

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
