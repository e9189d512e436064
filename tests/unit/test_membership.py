"""Membership of a run: admission, rejoin, heartbeats, leases, leaving at round boundaries."""

from __future__ import annotations

import pytest

from antorcha.averaging.base import PeerDescriptor
from antorcha.coordinator.membership import EvictedWorkerError, Membership, UnknownWorkerError, WorkerState
from antorcha.protocol import DeviceInfo, Progress


def _peer(name: str) -> PeerDescriptor:
    return PeerDescriptor(
        peer_id=f"peer-{name}", maddrs=(f"/ip4/127.0.0.1/tcp/{len(name)}",), client_mode=False
    )


def _join(members: Membership, name: str, now: float = 0.0, worker_id: str = "") -> str:
    record, _ = members.join(name=name, peer=_peer(name), device=DeviceInfo(), now=now, worker_id=worker_id)
    return record.worker_id


def test_join_admits_with_fresh_ids_and_increasing_slots() -> None:
    members = Membership(lease_s=5.0)
    record, reason = members.join(name="alice", peer=_peer("alice"), device=DeviceInfo("cuda"), now=1.0)
    other, _ = members.join(name="bob", peer=_peer("bob"), device=DeviceInfo(), now=2.0)
    assert record.worker_id != other.worker_id
    assert record.worker_id.startswith("w-")
    assert (record.slot, other.slot) == (0, 1)
    assert record.state == WorkerState.ACTIVE
    assert record.name == "alice"
    assert record.device.kind == "cuda"
    assert (record.joined_at, record.last_seen) == (1.0, 1.0)
    assert record.worker_id in reason and "slot 0" in reason


def test_join_without_name_uses_the_id() -> None:
    members = Membership(lease_s=5.0)
    record, _ = members.join(name="", peer=_peer("x"), device=DeviceInfo(), now=0.0)
    assert record.name == record.worker_id


def test_join_with_unknown_requested_id_keeps_that_id() -> None:
    members = Membership(lease_s=5.0)
    worker_id = _join(members, "alice", worker_id="w-remembered")
    assert worker_id == "w-remembered"
    assert members.get_active("w-remembered").slot == 0


def test_rejoin_keeps_slot_and_updates_peer() -> None:
    members = Membership(lease_s=5.0)
    first = _join(members, "alice", now=0.0)
    _join(members, "bob", now=0.0)
    assert members.expire(100.0)  # both lost
    assert members.workers[first].state == WorkerState.LOST

    new_peer = PeerDescriptor("peer-new", ("/ip4/10.0.0.1/tcp/9",), client_mode=True)
    record, reason = members.join(name="", peer=new_peer, device=DeviceInfo(), now=101.0, worker_id=first)
    assert record.worker_id == first
    assert record.slot == 0, "a rejoining worker keeps its slot"
    assert record.state == WorkerState.ACTIVE
    assert record.peer == new_peer
    assert record.name == "alice", "an empty name keeps the old one"
    assert record.last_seen == 101.0
    assert "rejoined" in reason and "lost" in reason
    assert len(members.workers) == 2
    third, _ = members.join(name="carol", peer=_peer("carol"), device=DeviceInfo(), now=102.0)
    assert third.slot == 2


def test_heartbeat_updates_progress_and_last_seen() -> None:
    members = Membership(lease_s=5.0)
    worker_id = _join(members, "alice", now=0.0)
    progress = Progress(round=3, inner_step=7, tokens=1234, loss=2.0, tokens_per_second=10.0)
    record = members.heartbeat(worker_id, progress, now=4.0)
    assert record.progress == progress
    assert record.last_seen == 4.0
    members.touch(worker_id, now=8.0)
    assert members.get_active(worker_id).last_seen == 8.0
    assert members.expire(12.9) == []


def test_unknown_or_inactive_workers_are_refused() -> None:
    members = Membership(lease_s=5.0)
    with pytest.raises(UnknownWorkerError):
        members.heartbeat("w-nobody", Progress(), now=0.0)
    with pytest.raises(UnknownWorkerError):
        members.touch("w-nobody", now=0.0)
    worker_id = _join(members, "alice")
    members.expire(10.0)
    with pytest.raises(UnknownWorkerError):
        members.heartbeat(worker_id, Progress(), now=10.0)
    with pytest.raises(UnknownWorkerError):
        members.get_active(worker_id)


def test_lease_expires_strictly_after_lease_s() -> None:
    members = Membership(lease_s=5.0)
    quiet = _join(members, "quiet", now=0.0)
    chatty = _join(members, "chatty", now=0.0)
    members.touch(chatty, now=4.0)
    assert members.expire(5.0) == [], "exactly lease_s of silence is still within the lease"
    dropped = members.expire(5.5)
    assert [w for w, _ in dropped] == [quiet]
    assert "lease" in dropped[0][1]
    assert members.workers[quiet].state == WorkerState.LOST
    assert [r.worker_id for r in members.active()] == [chatty]
    assert members.expire(100.0) == [(chatty, "no heartbeat for 96.0s > lease 5.0s")]


def test_expire_reports_each_worker_once() -> None:
    members = Membership(lease_s=1.0)
    _join(members, "a", now=0.0)
    assert len(members.expire(2.0)) == 1
    assert members.expire(3.0) == []


def test_leave_takes_effect_at_round_boundary() -> None:
    members = Membership(lease_s=5.0)
    a = _join(members, "a")
    b = _join(members, "b")
    reason = members.request_leave(a)
    assert "round boundary" in reason
    assert {r.worker_id for r in members.active()} == {a, b}, "still active until the boundary"
    assert members.apply_leaves() == [a]
    assert members.workers[a].state == WorkerState.LEFT
    assert [r.worker_id for r in members.active()] == [b]
    assert members.apply_leaves() == []


def test_leave_of_inactive_worker_is_a_no_op() -> None:
    members = Membership(lease_s=5.0)
    assert "not active" in members.request_leave("w-nobody")
    a = _join(members, "a")
    members.expire(10.0)
    assert "not active" in members.request_leave(a)
    assert not members.workers[a].leaving
    assert members.apply_leaves() == []
    assert members.workers[a].state == WorkerState.LOST


def test_rejoin_cancels_a_pending_leave() -> None:
    members = Membership(lease_s=5.0)
    a = _join(members, "a")
    members.request_leave(a)
    _join(members, "a", now=1.0, worker_id=a)
    assert members.apply_leaves() == []
    assert members.get_active(a).state == WorkerState.ACTIVE


def test_active_is_sorted_by_slot() -> None:
    members = Membership(lease_s=5.0)
    ids = [_join(members, name, now=0.0) for name in ("a", "b", "c", "d")]
    members.touch(ids[0], 3.0)
    members.touch(ids[2], 3.0)
    members.expire(6.0)  # b and d lost
    _join(members, "d", now=6.0, worker_id=ids[3])  # d comes back
    assert [r.worker_id for r in members.active()] == [ids[0], ids[2], ids[3]]
    assert [r.slot for r in members.active()] == [0, 2, 3]


def test_leave_then_silence_ends_left_not_lost() -> None:
    members = Membership(lease_s=5.0)
    leaver = _join(members, "leaver", now=0.0)
    stayer = _join(members, "stayer", now=0.0)
    members.request_leave(leaver)
    members.touch(stayer, now=4.0)
    dropped = members.expire(6.0)  # the leaver went quiet before the round boundary
    assert [w for w, _ in dropped] == [leaver]
    assert "lease" in dropped[0][1]
    assert members.workers[leaver].state == WorkerState.LEFT
    assert members.workers[stayer].state == WorkerState.ACTIVE
    assert members.apply_leaves() == [], "already gone; not counted again at the boundary"
    assert members.expire(100.0) == [(stayer, "no heartbeat for 96.0s > lease 5.0s")]
    assert members.workers[stayer].state == WorkerState.LOST
    assert members.workers[leaver].state == WorkerState.LEFT


def test_silence_without_leave_ends_lost() -> None:
    members = Membership(lease_s=5.0)
    ids = [_join(members, name, now=0.0) for name in ("a", "b", "c")]
    members.request_leave(ids[1])
    dropped = members.expire(5.1)
    assert [w for w, _ in dropped] == ids
    assert [members.workers[w].state for w in ids] == [WorkerState.LOST, WorkerState.LEFT, WorkerState.LOST]
    assert members.active() == []


def test_rejoin_after_lost_keeps_worker_id_and_slot() -> None:
    members = Membership(lease_s=5.0)
    a = _join(members, "a", now=0.0)
    b = _join(members, "b", now=0.0)
    members.touch(b, now=9.0)
    members.expire(10.0)
    assert members.workers[a].state == WorkerState.LOST
    record, reason = members.join(name="a", peer=_peer("a2"), device=DeviceInfo(), now=11.0, worker_id=a)
    assert (record.worker_id, record.slot, record.state) == (a, 0, WorkerState.ACTIVE)
    assert record.peer == _peer("a2")
    assert "rejoined" in reason and "lost" in reason
    assert [r.worker_id for r in members.active()] == [a, b]
    assert members.next_slot == 2, "a rejoin does not use up a slot"
    assert a not in {w for w, _ in members.expire(16.0)}, "the rejoin renewed the lease"
    assert members.workers[a].state == WorkerState.ACTIVE


def test_rejoin_after_leaving_by_silence_keeps_worker_id_and_slot_and_clears_leave() -> None:
    members = Membership(lease_s=5.0)
    _join(members, "a", now=0.0)
    b = _join(members, "b", now=0.0)
    members.request_leave(b)
    members.expire(10.0)
    assert members.workers[b].state == WorkerState.LEFT
    record, reason = members.join(name="b", peer=_peer("b"), device=DeviceInfo(), now=11.0, worker_id=b)
    assert (record.worker_id, record.slot, record.state, record.leaving) == (b, 1, WorkerState.ACTIVE, False)
    assert "left" in reason
    assert members.expire(20.0) == [(b, "no heartbeat for 9.0s > lease 5.0s")]
    assert members.workers[b].state == WorkerState.LOST, "the earlier leave request no longer applies"


def test_evicted_worker_is_inactive_and_may_not_rejoin_under_its_id() -> None:
    members = Membership(lease_s=5.0)
    a = _join(members, "a")
    changed, reason = members.evict(a)
    assert changed and "evicted" in reason and "was active" in reason
    assert members.workers[a].state == WorkerState.EVICTED
    assert members.active() == []
    with pytest.raises(UnknownWorkerError):
        members.get_active(a)
    with pytest.raises(EvictedWorkerError):
        _join(members, "a", worker_id=a)
    assert members.evict(a) == (False, f"worker {a} was already evicted")
    assert members.evict("w-nobody")[0] is False
    assert members.expire(now=1000.0) == []  # an evicted worker is not "lost" later
    b = _join(members, "a")  # a new identity is a new worker
    assert b != a


def test_evicting_a_worker_that_asked_to_leave_drops_the_leave() -> None:
    members = Membership(lease_s=5.0)
    a = _join(members, "a")
    members.request_leave(a)
    members.evict(a)
    assert members.apply_leaves() == []
    assert members.workers[a].state == WorkerState.EVICTED


def test_a_new_peer_under_a_live_identity_is_a_new_process_and_the_same_peer_is_not() -> None:
    members = Membership(lease_s=5.0)
    alice = _join(members, "alice", now=0.0)
    assert not members.replaces_live_process(alice, _peer("alice")), "same process, same peer"
    assert members.replaces_live_process(alice, _peer("alice-restarted"))
    assert not members.replaces_live_process("", _peer("x"))
    assert not members.replaces_live_process("w-never-admitted", _peer("x"))
    members.expire(100.0)
    assert not members.replaces_live_process(alice, _peer("alice-2")), "a lost lease was counted already"
