"""The run store: what the coordinator keeps across a crash, in one SQLite database."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from antorcha.averaging.base import PeerDescriptor
from antorcha.coordinator.core import CoordinatorCore, RoundLog
from antorcha.coordinator.ledger import DataLedger, Lease, TrainedShard
from antorcha.coordinator.membership import Membership, WorkerRecord, WorkerState
from antorcha.coordinator.store import RunSpecMismatchError, RunStore
from antorcha.protocol import DeviceInfo


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "run.sqlite"


@pytest.fixture
def store(db_path: Path) -> Iterator[RunStore]:
    s = RunStore(db_path)
    yield s
    s.close()


def _peer(name: str, *maddrs: str, client_mode: bool = False) -> PeerDescriptor:
    return PeerDescriptor(f"peer-{name}", maddrs or (f"/ip4/127.0.0.1/tcp/{4000 + len(name)}",), client_mode)


def _record(
    worker_id: str,
    slot: int,
    *,
    state: WorkerState = WorkerState.ACTIVE,
    rounds_contributed: int = 0,
    peer: PeerDescriptor | None = None,
    device: DeviceInfo | None = None,
) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        name=f"name-{worker_id}",
        peer=peer or _peer(worker_id),
        device=device or DeviceInfo(),
        slot=slot,
        joined_at=10.0,
        last_seen=20.0,
        state=state,
        rounds_contributed=rounds_contributed,
    )


def _round(
    round_: int,
    *,
    tokens: int | None = None,
    train_loss: float | None = None,
    eval_loss: float | None = None,
    failed_spans: int = 0,
    commits: dict[str, str] | None = None,
) -> RoundLog:
    return RoundLog(
        round=round_,
        workers=2,
        tokens=1000 * (round_ + 1) if tokens is None else tokens,
        train_loss=3.0 - 0.1 * round_ if train_loss is None else train_loss,
        eval_loss=3.1 - 0.1 * round_ if eval_loss is None else eval_loss,
        data_plane_bytes=4096,
        seconds=1.5,
        checksum=f"sum-{round_}",
        commits=dict(commits or {}),
        failed_spans=failed_spans,
    )


# ---- run spec ------------------------------------------------------------------------------------


def test_bind_run_first_time_then_resume_then_refuse_another_spec(store: RunStore, db_path: Path) -> None:
    assert store.bind_run('{"seed": 1}', "sha-one") is False, "a fresh database starts a new run"
    assert store.get_meta("run_spec_json") == '{"seed": 1}'
    assert store.get_meta("run_spec_sha256") == "sha-one"
    assert store.bind_run('{"seed": 1}', "sha-one") is True, "the same spec resumes"

    with pytest.raises(RunSpecMismatchError, match="data directory") as info:
        store.bind_run('{"seed": 2}', "sha-two")
    assert '{"seed": 1}' in str(info.value), "the message shows the stored spec"
    assert store.get_meta("run_spec_sha256") == "sha-one", "a refused spec changes nothing"

    reopened = RunStore(db_path)
    try:
        assert reopened.bind_run('{"seed": 1}', "sha-one") is True
        with pytest.raises(RunSpecMismatchError):
            reopened.bind_run('{"seed": 2}', "sha-two")
    finally:
        reopened.close()


def test_meta_round_trips_and_overwrites(store: RunStore) -> None:
    assert store.get_meta("missing") is None
    store.set_meta("state_bytes", "12")
    store.set_meta("state_bytes", "34")
    assert store.get_meta("state_bytes") == "34"


def test_store_creates_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "run.sqlite"
    s = RunStore(path)
    try:
        assert path.exists()
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()


# ---- workers -------------------------------------------------------------------------------------


def test_workers_round_trip_through_save_and_load_members(store: RunStore) -> None:
    records = [
        _record(
            "w-a",
            0,
            device=DeviceInfo("cuda", "H100", 80 * 2**30, 12345.5),
            rounds_contributed=7,
            peer=_peer("a", "/ip4/10.0.0.1/tcp/1", "/ip4/10.0.0.2/tcp/2"),
        ),
        _record("w-b", 1, state=WorkerState.LOST, rounds_contributed=3),
        _record(
            "w-c",
            2,
            state=WorkerState.LEFT,
            peer=PeerDescriptor("peer-c", (), client_mode=True),
            device=DeviceInfo("mps", "M2", 0, 0.0),
        ),
    ]
    for record in reversed(records):
        store.save_worker(record)

    members = Membership(lease_s=5.0)
    assert store.load_members(members, now=500.0) == 3
    assert list(members.workers) == ["w-a", "w-b", "w-c"], "loaded in slot order"
    for original in records:
        loaded = members.workers[original.worker_id]
        assert loaded.name == original.name
        assert loaded.slot == original.slot
        assert loaded.state == original.state and isinstance(loaded.state, WorkerState)
        assert loaded.rounds_contributed == original.rounds_contributed
        assert loaded.peer == original.peer
        assert isinstance(loaded.peer.maddrs, tuple)
        assert loaded.device == original.device
        assert loaded.last_seen == 500.0, "a reloaded worker gets a fresh lease to reconnect in"
    assert [r.worker_id for r in members.active()] == ["w-a"]
    assert members.expire(505.0) == []
    assert [w for w, _ in members.expire(505.5)] == ["w-a"]


def test_saving_a_worker_again_updates_its_row(store: RunStore) -> None:
    record = _record("w-a", 0)
    store.save_worker(record)
    record.state, record.rounds_contributed = WorkerState.LOST, 9
    store.save_worker(record)
    assert store.db.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 1
    members = Membership(lease_s=5.0)
    store.load_members(members, now=0.0)
    assert members.workers["w-a"].state == WorkerState.LOST
    assert members.workers["w-a"].rounds_contributed == 9


def test_next_slot_continues_after_the_highest_saved_slot(store: RunStore) -> None:
    store.save_worker(_record("w-x", 5, state=WorkerState.LOST))
    store.save_worker(_record("w-y", 2))
    members = Membership(lease_s=5.0)
    store.load_members(members, now=0.0)
    assert members.next_slot == 6
    record, _ = members.join(name="new", peer=_peer("n"), device=DeviceInfo(), now=1.0)
    assert record.slot == 6
    rejoined, _ = members.join(name="", peer=_peer("x"), device=DeviceInfo(), now=1.0, worker_id="w-x")
    assert (rejoined.slot, rejoined.state) == (5, WorkerState.ACTIVE)


def test_load_members_of_an_empty_store(store: RunStore) -> None:
    members = Membership(lease_s=5.0)
    assert store.load_members(members, now=0.0) == 0
    assert members.workers == {}
    assert members.next_slot == 0


# ---- rounds --------------------------------------------------------------------------------------


def test_rounds_save_update_and_load(store: RunStore) -> None:
    store.save_round(_round(0))
    store.save_round(_round(1, eval_loss=math.nan, commits={"w-a": "sum-1", "w-b": "sum-1"}))
    store.save_round(_round(2, train_loss=math.nan, failed_spans=2, commits={"w-a": "other"}))
    rows = store.load_rounds()
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[0]["train_loss"] == pytest.approx(3.0)
    assert rows[0]["tokens"] == 1000 and rows[0]["workers"] == 2 and rows[0]["checksum"] == "sum-0"
    assert rows[1]["eval_loss"] is None, "NaN is stored as NULL"
    assert rows[2]["train_loss"] is None
    assert (rows[1]["consistent"], rows[2]["consistent"]) == (1, 0)
    assert rows[2]["failed_spans"] == 2

    store.update_round(1, eval_loss=2.25, data_plane_bytes=99, consistent=False)
    store.update_round(0, eval_loss=math.nan, data_plane_bytes=7, consistent=True)
    rows = store.load_rounds()
    assert (rows[1]["eval_loss"], rows[1]["data_plane_bytes"], rows[1]["consistent"]) == (2.25, 99, 0)
    assert (rows[0]["eval_loss"], rows[0]["data_plane_bytes"]) == (None, 7)


def test_rounds_read_back_through_core_restore_nan_and_consistency(store: RunStore) -> None:
    original = [
        _round(0, eval_loss=math.nan),
        _round(1, train_loss=math.nan, commits={"w-a": "sum-1"}),
        _round(2, commits={"w-a": "sum-2", "w-b": "bad"}),
    ]
    for entry in original:
        store.save_round(entry)
    loaded = [CoordinatorCore._round_from_row(row) for row in store.load_rounds()]
    assert [e.round for e in loaded] == [0, 1, 2]
    assert math.isnan(loaded[0].eval_loss) and not math.isnan(loaded[0].train_loss)
    assert math.isnan(loaded[1].train_loss) and loaded[1].eval_loss == pytest.approx(3.0)
    assert [e.consistent for e in loaded] == [True, True, False]
    for before, after in zip(original, loaded, strict=True):
        assert (after.workers, after.tokens, after.checksum, after.seconds) == (
            before.workers,
            before.tokens,
            before.checksum,
            before.seconds,
        )


def test_saving_a_round_again_replaces_it(store: RunStore) -> None:
    store.save_round(_round(3, tokens=1))
    store.save_round(_round(3, tokens=2))
    rows = store.load_rounds()
    assert len(rows) == 1 and rows[0]["tokens"] == 2


def test_truncate_after_drops_later_rounds_and_their_shards(store: RunStore) -> None:
    for r in range(5):
        store.save_round(_round(r))
        store.save_trained([TrainedShard(0, 2 * r, "w-a", r), TrainedShard(0, 2 * r + 1, "w-b", r)])
    assert store.truncate_after(3) == 2
    assert [row["round"] for row in store.load_rounds()] == [0, 1, 2]
    assert {s.round for s in store.trained_shards()} == {0, 1, 2}
    assert len(store.trained_shards()) == 6
    assert store.truncate_after(10) == 0, "nothing at or past round 10"
    assert store.truncate_after(0) == 3
    assert store.load_rounds() == [] and store.trained_shards() == []


# ---- data ledger ---------------------------------------------------------------------------------


def test_a_shard_cannot_be_recorded_twice_in_one_epoch(store: RunStore) -> None:
    store.save_trained([TrainedShard(0, 4, "w-a", 0)])
    with pytest.raises(sqlite3.IntegrityError):
        store.save_trained([TrainedShard(0, 4, "w-b", 1)])
    with pytest.raises(sqlite3.IntegrityError), store.transaction():  # core always writes in one
        store.save_trained([TrainedShard(1, 5, "w-a", 2), TrainedShard(1, 5, "w-b", 2)])
    store.save_trained([TrainedShard(1, 4, "w-b", 1)])  # same shard, next epoch: fine
    assert [(s.epoch, s.shard, s.worker_id) for s in store.trained_shards()] == [
        (0, 4, "w-a"),
        (1, 4, "w-b"),
    ]


def test_a_round_that_would_train_a_shard_twice_is_not_committed(store: RunStore) -> None:
    store.save_trained([TrainedShard(0, 1, "w-a", 0)])
    with pytest.raises(sqlite3.IntegrityError), store.transaction():
        store.save_round(_round(1))
        store.save_trained([TrainedShard(0, 2, "w-a", 1), TrainedShard(0, 1, "w-b", 1)])
    assert store.load_rounds() == []
    assert store.trained_shards() == [TrainedShard(0, 1, "w-a", 0)]


def _run_ledger(store: RunStore, rounds: int) -> DataLedger:
    """Three workers over five shards with a crash now and then, each round persisted as core does;
    ends mid-round with open leases."""
    ledger = DataLedger(5, seed=11)
    workers = ["w-a", "w-b", "w-c"]
    for round_ in range(rounds):
        for worker_id in workers:
            ledger.lease(worker_id, round_)
        contributors = set(workers) - ({"w-c"} if round_ % 3 == 1 else set())
        with store.transaction():
            store.save_trained(ledger.complete_round(round_, contributors))
            store.save_leases(ledger)
    ledger.lease("w-a", rounds)
    ledger.lease("w-c", rounds)
    store.save_leases(ledger)
    return ledger


def _assert_same_ledger(loaded: DataLedger, original: DataLedger) -> None:
    assert loaded.epoch == original.epoch
    assert loaded.trained == original.trained
    assert loaded.leases == original.leases
    assert sorted(loaded.ahead, key=repr) == sorted(original.ahead, key=repr)
    assert sorted(loaded.history, key=repr) == sorted(original.history, key=repr)


@pytest.mark.parametrize("rounds", [0, 1, 2, 4, 7, 9])
def test_ledger_survives_save_and_load(store: RunStore, rounds: int) -> None:
    original = _run_ledger(store, rounds)
    loaded = DataLedger(5, seed=11)
    store.load_ledger(loaded)
    store.load_leases(loaded)
    _assert_same_ledger(loaded, original)
    # Both go on alike: the same leases, the same trained shards.
    for worker_id in ("w-a", "w-b", "w-c"):
        assert loaded.lease(worker_id, rounds) == original.lease(worker_id, rounds)
    assert loaded.complete_round(rounds, {"w-a", "w-b"}) == original.complete_round(rounds, {"w-a", "w-b"})
    _assert_same_ledger(loaded, original)


def test_ledger_with_shards_trained_ahead_survives_save_and_load(store: RunStore) -> None:
    ledger = DataLedger(4, seed=5)
    for worker_id in ("a", "b", "c"):
        ledger.lease(worker_id, 0)
    store.save_trained(ledger.complete_round(0, {"a", "b", "c"}))
    for worker_id in ("a", "b", "c"):
        ledger.lease(worker_id, 1)  # b and c lease into epoch 1
    store.save_trained(ledger.complete_round(1, {"b", "c"}))  # a misses the group
    assert ledger.epoch == 0 and len(ledger.ahead) == 2
    ledger.lease("a", 2)
    store.save_leases(ledger)

    loaded = DataLedger(4, seed=5)
    store.load_ledger(loaded)
    store.load_leases(loaded)
    _assert_same_ledger(loaded, ledger)
    assert loaded.leases == {"a": [Lease(0, ledger.order(0)[3], "a", 2)]}


def test_loading_an_empty_ledger(store: RunStore) -> None:
    ledger = DataLedger(3, seed=0)
    store.load_ledger(ledger)
    store.load_leases(ledger)
    assert (ledger.epoch, ledger.trained, ledger.leases, ledger.history, ledger.ahead) == (0, {}, {}, [], [])


def test_ledger_after_truncation_forgets_the_dropped_rounds(store: RunStore) -> None:
    ledger = DataLedger(4, seed=1)
    for round_ in range(6):
        ledger.lease("w-a", round_)
        store.save_trained(ledger.complete_round(round_, {"w-a"}))
    assert ledger.epoch == 1
    store.truncate_after(3)
    loaded = DataLedger(4, seed=1)
    store.load_ledger(loaded)
    assert loaded.epoch == 0
    assert set(loaded.trained) == set(ledger.order(0)[:3])
    assert loaded.lease("w-a", 3)[0] == Lease(0, ledger.order(0)[3], "w-a", 3)


# ---- transactions, events, durability ------------------------------------------------------------


def test_transaction_rolls_back_on_exception(store: RunStore) -> None:
    store.set_meta("kept", "1")
    with pytest.raises(RuntimeError, match="boom"), store.transaction():
        store.set_meta("kept", "2")
        store.save_round(_round(0))
        store.add_event("join", "w-a", 0)
        raise RuntimeError("boom")
    assert store.get_meta("kept") == "1"
    assert store.load_rounds() == []
    assert store.event_counts() == {}
    assert not store.db.in_transaction
    with store.transaction():  # the store is usable afterwards
        store.set_meta("kept", "3")
    assert store.get_meta("kept") == "3"


def test_transaction_commits(store: RunStore, db_path: Path) -> None:
    with store.transaction() as db:
        assert db is store.db
        store.save_round(_round(0))
    other = RunStore(db_path)
    try:
        assert [row["round"] for row in other.load_rounds()] == [0]
    finally:
        other.close()


def test_event_counts(store: RunStore) -> None:
    assert store.event_counts() == {}
    store.add_event("join", "w-a", 0, "admitted")
    store.add_event("join", "w-b")
    store.add_event("crash", "w-a", 3)
    store.add_event("restart", round_=4, detail="resumed at round 4")
    assert store.event_counts() == {"join": 2, "crash": 1, "restart": 1}


def _fill(store: RunStore) -> DataLedger:
    store.bind_run("{}", "sha")
    store.save_worker(_record("w-a", 0, rounds_contributed=2))
    store.save_worker(_record("w-b", 1, state=WorkerState.LOST))
    ledger = DataLedger(3, seed=4)
    for round_ in range(2):
        ledger.lease("w-a", round_)
        ledger.lease("w-b", round_)
        with store.transaction():
            store.save_round(_round(round_, eval_loss=math.nan))
            store.save_trained(ledger.complete_round(round_, {"w-a", "w-b"}))
            store.save_leases(ledger)
    ledger.lease("w-a", 2)
    store.save_leases(ledger)
    store.add_event("join", "w-a")
    store.add_event("crash", "w-b", 1)
    store.set_meta("state_bytes", "1234")
    return ledger


def _assert_filled(store: RunStore, ledger: DataLedger) -> None:
    assert store.bind_run("{}", "sha") is True
    members = Membership(lease_s=5.0)
    assert store.load_members(members, now=0.0) == 2
    assert members.workers["w-a"].rounds_contributed == 2
    assert members.workers["w-b"].state == WorkerState.LOST
    assert members.next_slot == 2
    rows = store.load_rounds()
    assert [row["round"] for row in rows] == [0, 1] and rows[0]["eval_loss"] is None
    loaded = DataLedger(3, seed=4)
    store.load_ledger(loaded)
    store.load_leases(loaded)
    _assert_same_ledger(loaded, ledger)
    assert store.event_counts() == {"join": 1, "crash": 1}
    assert store.get_meta("state_bytes") == "1234"


def test_a_reopened_store_sees_everything_committed(db_path: Path) -> None:
    first = RunStore(db_path)
    ledger = _fill(first)
    first.close()
    second = RunStore(db_path)
    try:
        _assert_filled(second, ledger)
    finally:
        second.close()


def test_a_store_opened_while_the_old_one_is_still_open_sees_committed_data(db_path: Path) -> None:
    """A coordinator that died without closing: a new one on the same file sees every committed write."""
    first = RunStore(db_path)
    try:
        ledger = _fill(first)
        second = RunStore(db_path)
        try:
            _assert_filled(second, ledger)
        finally:
            second.close()
    finally:
        first.close()


def test_an_uncommitted_transaction_is_lost_on_a_crash(db_path: Path) -> None:
    first = RunStore(db_path)
    first.save_round(_round(0))
    first.db.execute("BEGIN IMMEDIATE")
    first.save_round(_round(1))
    first.save_trained([TrainedShard(0, 0, "w-a", 1)])
    first.db.close()  # dies mid-transaction
    second = RunStore(db_path)
    try:
        assert [row["round"] for row in second.load_rounds()] == [0]
        assert second.trained_shards() == []
    finally:
        second.close()
