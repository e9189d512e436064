"""The shard-granting rule of token-budget rounds: everyone trains, the budget is never exceeded, and
near the end a slow worker is not handed a shard that would keep the round waiting for it."""

from __future__ import annotations

import pytest

from antorcha.coordinator.budget import BudgetView, next_shard_refusal

SHARD = 1000


def _view(**changes: object) -> BudgetView:
    base: dict[str, object] = dict(
        mode="token_budget",
        round=3,
        index=1,
        budget_tokens=20 * SHARD,
        leased_shards=4,
        shard_tokens=SHARD,
        my_shard_seconds=1.0,
        others_shard_seconds=[1.0],
    )
    base.update(changes)
    return BudgetView(**base)  # type: ignore[arg-type]


def test_the_first_shard_of_a_round_is_always_granted() -> None:
    assert next_shard_refusal(_view(index=0, leased_shards=20, my_shard_seconds=100.0)) == ""
    assert next_shard_refusal(_view(index=0, mode="fixed_steps")) == ""


def test_fixed_steps_rounds_give_one_shard_per_worker() -> None:
    assert "fixed-H" in next_shard_refusal(_view(mode="fixed_steps", leased_shards=0))


@pytest.mark.parametrize(("leased", "granted"), [(18, True), (19, True), (20, False), (25, False)])
def test_shards_are_granted_until_the_budget_is_taken(leased: int, granted: bool) -> None:
    reason = next_shard_refusal(_view(leased_shards=leased, my_shard_seconds=None))
    assert (reason == "") is granted
    if not granted:
        assert "budget is taken" in reason


def test_an_unmeasured_worker_gets_a_shard_while_budget_remains() -> None:
    assert (
        next_shard_refusal(_view(leased_shards=19, my_shard_seconds=None, others_shard_seconds=[0.1])) == ""
    )


def test_near_the_end_the_last_shard_goes_to_the_fast_worker() -> None:
    """Speeds 1 and 1/3, one shard left: the fast worker does it in 1 s; the slow one would take 3 s
    while the round would otherwise end in 0.75 s."""
    slow = _view(leased_shards=19, my_shard_seconds=3.0, others_shard_seconds=[1.0])
    fast = _view(leased_shards=19, my_shard_seconds=1.0, others_shard_seconds=[3.0])
    assert "without you" in next_shard_refusal(slow)
    assert next_shard_refusal(fast) == ""


def test_with_plenty_left_the_slow_worker_keeps_training() -> None:
    assert next_shard_refusal(_view(leased_shards=8, my_shard_seconds=3.0, others_shard_seconds=[1.0])) == ""


def test_a_lone_worker_finishes_the_budget_however_slow() -> None:
    assert next_shard_refusal(_view(leased_shards=19, my_shard_seconds=50.0, others_shard_seconds=[])) == ""


def test_greedy_granting_splits_the_budget_by_speed_with_little_idle() -> None:
    """Simulate two workers (1 s and 3 s per shard) leasing a 24-shard budget: the fast one gets about
    three times the slow one's share, and the round ends within one fast shard of the ideal time."""
    seconds = {"fast": 1.0, "slow": 3.0}
    free_at = {"fast": 0.0, "slow": 0.0}
    held = {"fast": 0, "slow": 0}
    done: set[str] = set()
    leased = 0
    while len(done) < 2:
        worker = min((w for w in free_at if w not in done), key=lambda w: free_at[w])
        other = [seconds[w] for w in seconds if w != worker and w not in done]
        view = _view(
            index=held[worker],
            leased_shards=leased,
            budget_tokens=24 * SHARD,
            my_shard_seconds=seconds[worker] if held[worker] else None,
            others_shard_seconds=other,
        )
        if next_shard_refusal(view):
            done.add(worker)
            continue
        held[worker] += 1
        leased += 1
        free_at[worker] += seconds[worker]
    assert leased == 24
    assert held["fast"] >= 3 * held["slow"] - 1
    ideal = 24 / (1 / 1.0 + 1 / 3.0)  # 18 s if the work were perfectly divisible
    assert max(free_at.values()) <= ideal + 1.0
