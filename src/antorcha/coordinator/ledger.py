"""Which data each worker trains on, so that within an epoch no shard is trained twice or skipped,
whoever comes and goes. Pure: no clocks, no I/O; the store persists it.

A shard is one round's worth of one worker's tokens. At the start of a round a worker leases a
shard; the lease becomes "trained" when the round closes with that worker in its averaging group, and
goes back to the pool if the worker dies, leaves, or misses the group. When every shard of an epoch
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
    leases: dict[str, Lease] = field(default_factory=dict)  # worker id -> its current lease
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

    def lease(self, worker_id: str, round_: int) -> tuple[Lease, str]:
        """The shard `worker_id` trains in `round_`; asking again for the same round gives the same one."""
        current = self.leases.get(worker_id)
        if current is not None and current.round == round_:
            return current, f"{worker_id} keeps shard {current.shard} for round {round_}"
        if current is not None:
            self.leases.pop(worker_id)  # a lease of an earlier round that never completed
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
            taken = {lease.shard for lease in self.leases.values() if lease.epoch == epoch}
            free = [s for s in self.order(epoch) if s not in done and s not in taken]
            if free:
                break
            epoch += 1
        lease = Lease(epoch, free[0], worker_id, round_)
        self.leases[worker_id] = lease
        return lease, f"{worker_id} leased shard {lease.shard} of epoch {lease.epoch} for round {round_}"

    def complete_round(self, round_: int, contributors: set[str]) -> list[TrainedShard]:
        """Round closed: contributors' leases for it are trained; other leases of it return to the pool."""
        done = []
        for worker_id, lease in list(self.leases.items()):
            if lease.round != round_:
                continue
            del self.leases[worker_id]
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

    def release(self, worker_id: str) -> Lease | None:
        """The worker is gone: its unfinished lease goes back to the pool."""
        return self.leases.pop(worker_id, None)
