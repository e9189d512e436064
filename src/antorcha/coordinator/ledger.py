"""Which data each worker trains on, so that within an epoch no shard is trained twice or skipped,
whoever comes and goes. Pure: no clocks, no I/O; the store persists it.

A shard is a fixed number of inner steps' worth of one worker's tokens (a whole round's in the classic
fixed-H mode, a slice of it in token-budget mode, where a fast worker leases more shards per round
than a slow one). A worker leases shards for a round one after the other (index 0, 1, …); its leases
become "trained" when the round closes with that worker in its averaging group, and go back to the
pool if the worker dies, leaves, or misses the group. When every shard of an epoch
is trained, the next epoch starts with a new order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Lease:
    epoch: int
    shard: int
    worker_id: str
    round: int
    index: int = 0  # the worker's n-th shard of the round


@dataclass(frozen=True)
class TrainedShard:
    epoch: int
    shard: int
    worker_id: str
    round: int


@dataclass
class DataLedger:
    num_shards: int
    seed: int = 0
    epoch: int = 0
    leases: dict[str, list[Lease]] = field(default_factory=dict)  # worker id -> its leases, in order
    trained: dict[int, TrainedShard] = field(default_factory=dict)  # this epoch's shard -> who trained it
    history: list[TrainedShard] = field(default_factory=list)  # every epoch, in order
    ahead: list[TrainedShard] = field(default_factory=list)  # trained early, for the next epoch

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("a ledger needs at least one shard")

    def order(self, epoch: int) -> list[int]:
        """The shard order of an epoch: a permutation fixed by the seed, different every epoch."""
        shards = list(range(self.num_shards))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        return shards

    def held(self, worker_id: str, round_: int) -> list[Lease]:
        """The leases `worker_id` holds for `round_`, in the order it was given them."""
        return [lease for lease in self.leases.get(worker_id, []) if lease.round == round_]

    def all_leases(self) -> list[Lease]:
        return [lease for held in self.leases.values() for lease in held]

    def lease(self, worker_id: str, round_: int, index: int = 0) -> tuple[Lease, str]:
        """The `index`-th shard `worker_id` trains in `round_`; asking again gives the same one."""
        # With overlap a worker trains round r+1 while round r averages, so it holds the leases of both
        # until r closes. Leases of rounds before that never completed: they go back to the pool.
        mine = [lease for lease in self.leases.get(worker_id, []) if lease.round >= round_ - 1]
        current = [lease for lease in mine if lease.round == round_]
        if index < len(current):
            kept = current[index]
            return kept, f"{worker_id} keeps shard {kept.shard} (#{index}) for round {round_}"
        if index > len(current):
            held = len(current)
            raise ValueError(f"{worker_id} asked for shard #{index} of round {round_} but holds {held}")
        self.leases[worker_id] = mine
        self.advance_if_complete()
        # Normally a free shard of this epoch; if every one left is leased to someone else, look in the
        # following epochs rather than idle (never a shard already trained or leased in that epoch).
        epoch = self.epoch
        while True:
            done = (
                set(self.trained)
                if epoch == self.epoch
                else {r.shard for r in self.ahead if r.epoch == epoch}
            )
            taken = {lease.shard for lease in self.all_leases() if lease.epoch == epoch}
            free = [s for s in self.order(epoch) if s not in done and s not in taken]
            if free:
                break
            epoch += 1
        lease = Lease(epoch, free[0], worker_id, round_, index)
        mine.append(lease)
        return lease, f"{worker_id} leased shard {lease.shard} of epoch {lease.epoch} for round {round_}"

    def complete_round(self, round_: int, contributors: set[str]) -> list[TrainedShard]:
        """Round closed: contributors' leases for it are trained; other leases of it return to the pool."""
        done = []
        finished = [lease for lease in self.all_leases() if lease.round == round_]
        for worker_id in {lease.worker_id for lease in finished}:
            kept = [lease for lease in self.leases[worker_id] if lease.round != round_]
            if kept:
                self.leases[worker_id] = kept
            else:
                del self.leases[worker_id]
        for lease in finished:
            worker_id = lease.worker_id
            if worker_id not in contributors:
                continue
            record = TrainedShard(lease.epoch, lease.shard, worker_id, round_)
            if lease.epoch == self.epoch and lease.shard not in self.trained:
                self.trained[lease.shard] = record
            elif lease.epoch > self.epoch:
                self.ahead.append(record)  # counts in the next epoch once this one is complete
            done.append(record)
            self.history.append(record)
        self.advance_if_complete()
        return done

    def advance_if_complete(self) -> None:
        while len(self.trained) == self.num_shards:
            self.epoch += 1
            self.trained = {r.shard: r for r in self.ahead if r.epoch == self.epoch}
            self.ahead = [r for r in self.ahead if r.epoch > self.epoch]

    def release(self, worker_id: str) -> list[Lease]:
        """The worker is gone: its unfinished leases go back to the pool."""
        return self.leases.pop(worker_id, [])
