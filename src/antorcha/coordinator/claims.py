"""Whether the tokens a worker claims for a round are possible. Pure: a claim and what the
coordinator observed in, a refusal reason (or "") out; no clocks, no I/O.

Tokens decide averaging weights, so they are an attack surface: a worker claiming 100× its tokens
would outweigh everyone. The coordinator checks a claim against what it knows first-hand:

1. **Leases.** The coordinator handed out the round's shards (`LeaseData`), so a worker cannot have
   trained more tokens in a round than the shards it leased in that round hold.
2. **Wall time.** Compute time cannot exceed the time since the worker's first lease of the round
   (with slack for clock granularity), and the tokens cannot exceed `rate_slack` × the throughput the
   coordinator measured for it (shard tokens over the time between its lease calls) × that time.
   Self-declared rates (Join, heartbeats) are not used: they are the worker's word.
"""

from __future__ import annotations

from dataclasses import dataclass

WALL_GRACE_S = 2.0  # RPC latency and clock granularity between a lease and the report


@dataclass(frozen=True)
class Claim:
    tokens: int  # claimed in ReportRound
    compute_seconds: float  # claimed in ReportRound
    leased_tokens: int  # tokens of the shards the coordinator leased to this worker in this round
    wall_seconds: float | None  # since its first lease of the round; None: no lease seen (e.g. restart)
    measured_rate: float | None  # tokens/s measured from its lease timing; None: not measured yet


def claim_refusal(claim: Claim, rate_slack: float) -> str:
    """Why `claim` is impossible ("" when it is possible)."""
    if claim.tokens > claim.leased_tokens:
        return (
            f"claims {claim.tokens} tokens but the shards leased to it in this round hold "
            f"{claim.leased_tokens}"
        )
    if claim.wall_seconds is None:
        return ""
    if claim.compute_seconds > claim.wall_seconds * rate_slack + WALL_GRACE_S:
        return (
            f"claims {claim.compute_seconds:.1f}s of compute but its round lasted {claim.wall_seconds:.1f}s "
            "since its first lease"
        )
    if claim.measured_rate is not None and claim.measured_rate > 0:
        bound = rate_slack * claim.measured_rate * (claim.wall_seconds + WALL_GRACE_S)
        if claim.tokens > bound:
            return (
                f"claims {claim.tokens} tokens in {claim.wall_seconds:.1f}s; its measured throughput "
                f"{claim.measured_rate:.0f} tokens/s allows at most {bound:.0f} (slack {rate_slack:g})"
            )
    return ""
