"""Who trains how much of a round: the rule that hands out data shards within a round's token budget.
Pure: the coordinator passes in what it measured and gets back a refusal reason or "" (grant).

Token-budget rounds are how unequal hardware is used fully: a round's budget (H steps' worth of
tokens per worker) is cut into small shards that workers lease one after another, so a fast worker
trains more of it than a slow one, and the round closes when the budget is taken. Near the end, a
shard goes to whoever finishes it before the round would end anyway: a slow worker starting one more
shard would keep everyone waiting for it, which is the waste fixed-H rounds have every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A worker may start a shard that ends a little after the projected end of the round: the
# projection ignores shards already in progress, so it runs a little early.
_SLACK = 1.1


@dataclass(frozen=True)
class BudgetView:
    mode: str  # "token_budget" or "fixed_steps"
    round: int
    index: int  # shards of this round the asking worker already holds
    budget_tokens: int
    leased_shards: int  # shards of this round leased so far, by everyone
    shard_tokens: int
    my_shard_seconds: float | None  # measured time the asking worker needs for one shard
    others_shard_seconds: list[float | None] = field(default_factory=list)  # the others still training


def next_shard_refusal(view: BudgetView) -> str:
    """Why the asking worker gets no further shard of the round; "" when it gets one."""
    if view.index == 0:
        return ""  # everyone who takes part trains at least one shard
    if view.mode == "fixed_steps":
        return f"fixed-H round: one shard per worker in round {view.round}"
    remaining = view.budget_tokens - view.leased_shards * view.shard_tokens
    if remaining < view.shard_tokens / 2:
        return f"round {view.round}'s token budget is taken"
    mine = view.my_shard_seconds
    if mine is None:
        return ""
    known = [s for s in view.others_shard_seconds if s is not None] + [mine]
    typical = sorted(known)[len(known) // 2]  # for a worker not measured yet
    shards_per_second = 1.0 / mine + sum(1.0 / (s or typical) for s in view.others_shard_seconds)
    shards_left = remaining / view.shard_tokens
    projected = shards_left / shards_per_second
    fastest_other = min((s or typical for s in view.others_shard_seconds), default=mine)
    # The last shards go to whoever finishes them soonest, even if that is after the projection.
    if mine <= _SLACK * max(projected, fastest_other):
        return ""
    return (
        f"the {shards_left:.1f} shards left of round {view.round} are done in ~{projected:.1f}s "
        f"without you; one takes you {mine:.1f}s"
    )
