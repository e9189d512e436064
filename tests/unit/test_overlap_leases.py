"""Leases with overlapped averaging: a worker that has handed round r to its averaging thread trains
round r+1 at once, before the slowest worker has reported r. The coordinator must lease r+1 then
(only when the run overlaps), never r+2, and keep the worker's lease of r until r closes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from antorcha.averaging.base import PeerDescriptor
from antorcha.config import CoordinatorSettings, RunSpec
from antorcha.coordinator.core import CoordinatorCore
from antorcha.coordinator.rounds import Phase
from antorcha.protocol import DeviceInfo


def _core(overlap: bool) -> tuple[CoordinatorCore, str, str]:
    spec = RunSpec(run_id="unit", min_workers=2, max_rounds=0, round_mode="fixed_steps", overlap=overlap)
    replica = SimpleNamespace(num_data_shards=64)  # all the core asks of a replica outside rounds
    core = CoordinatorCore(spec, CoordinatorSettings(), replica, SimpleNamespace())  # type: ignore[arg-type]
    ids = []
    for name in ("fast", "slow"):
        peer = PeerDescriptor(f"peer-{name}", (), True)
        record, _ = core.join(name=name, peer=peer, device=DeviceInfo("cpu", "CPU"), worker_id="")
        ids.append(record.worker_id)
    core.tick(0.0)
    assert core.rounds.phase == Phase.TRAINING and core.rounds.round == 0
    return core, ids[0], ids[1]


@pytest.mark.parametrize("overlap", [True, False])
def test_the_next_round_is_leased_while_this_one_trains_only_with_overlap(overlap: bool) -> None:
    core, fast, slow = _core(overlap)
    this_round = core.lease_data(fast, 0, 0).lease
    assert this_round is not None and core.lease_data(slow, 0, 0).lease is not None
    ahead = core.lease_data(fast, 1, 0)  # "slow" has not reported round 0: no group yet
    if overlap:
        assert ahead.lease is not None and ahead.lease.round == 1
        assert ahead.lease.shard != this_round.shard
        assert core.ledger.held(fast, 0) == [this_round], "round 0's shard stays leased until it closes"
    else:
        assert ahead.lease is None and "round 1 is not open" in ahead.reason
    two_ahead = core.lease_data(fast, 2, 0)
    assert two_ahead.lease is None and "round 2 is not open" in two_ahead.reason
