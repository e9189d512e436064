"""The data ledger: within an epoch every shard is trained exactly once, whoever comes and goes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from antorcha.coordinator.ledger import DataLedger, Lease, TrainedShard

WORKERS = ("a", "b", "c")


def _shards_by_epoch(history: list[TrainedShard]) -> dict[int, Counter[int]]:
    by_epoch: dict[int, Counter[int]] = {}
    for record in history:
        by_epoch.setdefault(record.epoch, Counter())[record.shard] += 1
    return by_epoch


def _assert_consistent(ledger: DataLedger) -> None:
    """Every finished epoch trained each shard exactly once; no epoch trained any shard twice; the
    current epoch's `trained` and the `ahead` list are exactly what `history` says."""
    by_epoch = _shards_by_epoch(ledger.history)
    for epoch, counts in sorted(by_epoch.items()):
        twice = {shard: n for shard, n in counts.items() if n > 1}
        assert not twice, f"epoch {epoch}: shards trained more than once {twice} in {ledger.history}"
    for epoch in range(ledger.epoch):
        assert sorted(by_epoch.get(epoch, Counter())) == list(range(ledger.num_shards)), (
            f"finished epoch {epoch} did not train every shard exactly once"
        )
    current = {r for r in ledger.history if r.epoch == ledger.epoch}
    assert set(ledger.trained.values()) == current
    assert all(shard == r.shard for shard, r in ledger.trained.items())
    assert sorted(ledger.ahead, key=lambda r: (r.epoch, r.shard)) == sorted(
        (r for r in ledger.history if r.epoch > ledger.epoch), key=lambda r: (r.epoch, r.shard)
    )
    assert len(ledger.trained) < ledger.num_shards, "a complete epoch must have advanced"


def _simulate(num_shards: int, seed: int, crash_p: float, release_p: float, rounds: int) -> DataLedger:
    """Three workers; each round every present worker leases a shard (in a random order), some then
    crash (absent from the contributors) or are released mid-round (and stay away for a few rounds)."""
    rng = random.Random(seed)
    ledger = DataLedger(num_shards, seed=seed)
    away: dict[str, int] = {}  # worker -> first round it is back
    for round_ in range(rounds):
        present = [w for w in WORKERS if away.get(w, 0) <= round_]
        rng.shuffle(present)
        leases = {}
        for worker_id in present:
            lease, _ = ledger.lease(worker_id, round_)
            assert lease.worker_id == worker_id and lease.round == round_
            assert lease.epoch >= ledger.epoch
            leases[worker_id] = lease
        held = [(lease.epoch, lease.shard) for lease in ledger.all_leases()]
        assert len(held) == len(set(held)), f"round {round_}: one shard leased twice {ledger.leases}"
        contributors = set()
        for worker_id in present:
            roll = rng.random()
            if roll < release_p:
                assert ledger.release(worker_id) == [leases[worker_id]]
                away[worker_id] = round_ + 1 + rng.randrange(3)
            elif roll < release_p + crash_p:
                pass  # crashed or missed the group: leased, but not a contributor
            else:
                contributors.add(worker_id)
        done = ledger.complete_round(round_, contributors)
        assert {(r.worker_id, r.epoch, r.shard) for r in done} == {
            (w, leases[w].epoch, leases[w].shard) for w in contributors
        }
        assert not any(lease.round == round_ for lease in ledger.all_leases())
        _assert_consistent(ledger)
    return ledger


@pytest.mark.parametrize("num_shards", [2, 3, 5, 8, 13])
@pytest.mark.parametrize(
    ("crash_p", "release_p"),
    [(0.0, 0.0), (0.3, 0.0), (0.0, 0.3), (0.2, 0.2), (0.5, 0.1)],
    ids=["steady", "crashes", "releases", "mixed", "heavy"],
)
def test_every_shard_is_trained_exactly_once_per_epoch_under_churn(
    num_shards: int, crash_p: float, release_p: float
) -> None:
    for seed in range(8):
        ledger = _simulate(num_shards, seed, crash_p, release_p, rounds=8 * num_shards)
        assert ledger.epoch >= 2, "the simulation should go through several epochs"


def test_fewer_than_one_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        DataLedger(0)
    with pytest.raises(ValueError):
        DataLedger(-3)
    assert DataLedger(1).num_shards == 1


def test_leasing_twice_for_the_same_round_gives_the_same_lease() -> None:
    ledger = DataLedger(10, seed=1)
    first, reason = ledger.lease("a", 0)
    again, again_reason = ledger.lease("a", 0)
    assert again == first
    assert "leased" in reason and "keeps" in again_reason
    other, _ = ledger.lease("b", 0)
    assert other.shard != first.shard
    assert ledger.lease("a", 0)[0] == first
    assert ledger.leases == {"a": [first], "b": [other]}


def test_a_stale_lease_of_an_earlier_round_is_replaced() -> None:
    ledger = DataLedger(10, seed=1)
    old, _ = ledger.lease("a", 0)
    new, _ = ledger.lease("a", 2)  # round 0 never closed for a, and a is two rounds on
    assert new.round == 2
    assert new.shard == old.shard, "the untrained shard is free again, first in the order"
    assert ledger.leases == {"a": [new]}
    assert ledger.complete_round(0, {"a"}) == [], "the stale lease no longer counts"
    assert ledger.complete_round(2, {"a"}) == [TrainedShard(0, new.shard, "a", 2)]


def test_with_overlap_a_worker_holds_the_averaging_round_and_the_next() -> None:
    """Round r averages while the worker trains r+1: r's shard stays leased (it is in the average) and
    r+1 gets a different one; closing r marks r's shard trained. Dropping r's lease here once made
    every overlapped round train the same shard again."""
    ledger = DataLedger(10, seed=1)
    order = ledger.order(0)
    averaging, _ = ledger.lease("a", 0)
    training, _ = ledger.lease("a", 1)
    assert (averaging.shard, training.shard) == (order[0], order[1])
    assert ledger.leases == {"a": [averaging, training]}
    assert ledger.lease("a", 1)[0] == training, "a retried lease of r+1 is the same"
    assert ledger.complete_round(0, {"a"}) == [TrainedShard(0, order[0], "a", 0)]
    assert ledger.leases == {"a": [training]}
    following, _ = ledger.lease("a", 2)
    assert following.shard == order[2]
    assert ledger.complete_round(1, {"a"}) == [TrainedShard(0, order[1], "a", 1)]


def test_a_released_lease_goes_to_the_next_worker() -> None:
    ledger = DataLedger(6, seed=3)
    order = ledger.order(0)
    a, _ = ledger.lease("a", 0)
    b, _ = ledger.lease("b", 0)
    assert (a.shard, b.shard) == (order[0], order[1])
    assert ledger.release("a") == [a]
    assert ledger.release("a") == [], "releasing twice is harmless"
    c, _ = ledger.lease("c", 0)
    assert c == Lease(0, order[0], "c", 0), "the released shard is handed out first"
    done = ledger.complete_round(0, {"a", "b", "c"})
    assert {(r.worker_id, r.shard) for r in done} == {("b", order[1]), ("c", order[0])}
    assert set(ledger.trained) == {order[0], order[1]}


def test_a_worker_missing_from_the_group_returns_its_shard() -> None:
    ledger = DataLedger(4, seed=0)
    order = ledger.order(0)
    ledger.lease("a", 0)
    ledger.lease("b", 0)
    assert [r.worker_id for r in ledger.complete_round(0, {"b"})] == ["b"]
    assert set(ledger.trained) == {order[1]}
    assert ledger.leases == {}
    assert ledger.lease("c", 1)[0].shard == order[0]


def test_order_is_a_permutation_fixed_by_seed_and_different_every_epoch() -> None:
    ledger = DataLedger(12, seed=7)
    orders = [ledger.order(epoch) for epoch in range(6)]
    for order in orders:
        assert sorted(order) == list(range(12))
    assert len({tuple(o) for o in orders}) == len(orders), "each epoch has its own order"
    assert DataLedger(12, seed=7).order(3) == orders[3], "the order depends only on seed and epoch"
    assert DataLedger(12, seed=8).order(0) != orders[0]


def test_epochs_advance_and_follow_each_epochs_order() -> None:
    ledger = DataLedger(5, seed=2)
    round_ = 0
    for epoch in range(3):
        assert ledger.epoch == epoch
        leased = []
        for _ in range(5):
            lease, _ = ledger.lease("a", round_)
            assert lease.epoch == epoch
            leased.append(lease.shard)
            ledger.complete_round(round_, {"a"})
            round_ += 1
        assert leased == ledger.order(epoch)
        assert ledger.trained == {}
    assert ledger.epoch == 3
    assert len(ledger.history) == 15
    _assert_consistent(ledger)


def test_leasing_ahead_when_the_rest_of_the_epoch_is_leased_to_others() -> None:
    ledger = DataLedger(4, seed=5)
    o0, o1 = ledger.order(0), ledger.order(1)
    for worker_id in WORKERS:
        ledger.lease(worker_id, 0)
    ledger.complete_round(0, set(WORKERS))
    assert set(ledger.trained) == set(o0[:3])

    a, _ = ledger.lease("a", 1)
    b, reason = ledger.lease("b", 1)
    c, _ = ledger.lease("c", 1)
    assert a == Lease(0, o0[3], "a", 1)
    assert (b.epoch, b.shard) == (1, o1[0]) and "epoch 1" in reason
    assert (c.epoch, c.shard) == (1, o1[1])

    # b finishes its next-epoch shard before a finishes the last shard of this epoch.
    done = ledger.complete_round(1, {"b", "c"})
    assert {(r.epoch, r.shard) for r in done} == {(1, o1[0]), (1, o1[1])}
    assert ledger.epoch == 0, "this epoch is not complete: a's shard went back to the pool"
    assert len(ledger.trained) == 3, "next-epoch shards do not count in this epoch"
    assert sorted(r.shard for r in ledger.ahead) == sorted(o1[:2])
    _assert_consistent(ledger)

    a, _ = ledger.lease("a", 2)
    b, _ = ledger.lease("b", 2)  # c sits this round out
    assert a == Lease(0, o0[3], "a", 2)
    assert (b.epoch, b.shard) == (1, o1[2]), "shards already trained ahead must not be leased again"
    ledger.complete_round(2, {"a", "b"})
    assert ledger.epoch == 1
    assert set(ledger.trained) == set(o1[:3]), "shards trained ahead count in the next epoch"
    assert ledger.ahead == []
    assert ledger.lease("c", 3)[0] == Lease(1, o1[3], "c", 3)
    _assert_consistent(ledger)


def test_leasing_ahead_without_churn_counts_each_shard_once() -> None:
    ledger = DataLedger(4, seed=9)
    for round_ in range(12):
        for worker_id in WORKERS:
            ledger.lease(worker_id, round_)
        ledger.complete_round(round_, set(WORKERS))
        _assert_consistent(ledger)
    assert ledger.epoch == 9
    assert len(ledger.history) == 36


def test_more_workers_than_twice_the_shards_still_get_distinct_leases() -> None:
    ledger = DataLedger(1, seed=0)
    leases = [ledger.lease(worker_id, 0)[0] for worker_id in WORKERS]
    assert len({(lease.epoch, lease.shard) for lease in leases}) == len(leases)
    ledger.complete_round(0, set(WORKERS))
    assert ledger.epoch == 3
    _assert_consistent(ledger)


def test_token_budget_rounds_lease_several_shards_in_order_and_complete_them_all() -> None:
    ledger = DataLedger(num_shards=10, seed=4)
    order = ledger.order(0)
    fast = [ledger.lease("fast", 0, i)[0] for i in range(3)]
    slow, _ = ledger.lease("slow", 0, 0)
    assert [lease.shard for lease in fast] == order[:3] and slow.shard == order[3]
    assert [lease.index for lease in fast] == [0, 1, 2]
    assert ledger.lease("fast", 0, 1)[0] == fast[1], "asking again for #1 gives the same shard"
    with pytest.raises(ValueError, match="holds 3"):
        ledger.lease("fast", 0, 5)
    done = ledger.complete_round(0, {"fast", "slow"})
    assert sorted(r.shard for r in done) == sorted(order[:4])
    assert ledger.all_leases() == []


def test_a_crashed_worker_returns_every_shard_it_held() -> None:
    ledger = DataLedger(num_shards=10, seed=4)
    held = [ledger.lease("a", 0, i)[0] for i in range(3)]
    assert ledger.release("a") == held
    assert [ledger.lease("b", 0, i)[0].shard for i in range(3)] == [lease.shard for lease in held]
