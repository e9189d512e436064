"""What the coordinator must not forget across a crash: the run spec, the workers, the round log,
the data ledger, events and counters, in one SQLite database (WAL, synchronous=FULL).

The global state itself lives in checkpoint files (`checkpoints`); a round's row is written before
its checkpoint, and on restart rows at or past the newest valid checkpoint are dropped, so the round
log never has a gap and never counts a round twice.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from antorcha.averaging.base import PeerDescriptor
from antorcha.coordinator.ledger import DataLedger, Lease, TrainedShard
from antorcha.coordinator.membership import Membership, WorkerRecord, WorkerState
from antorcha.protocol import DeviceInfo

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, name TEXT NOT NULL, slot INTEGER NOT NULL, state TEXT NOT NULL,
    rounds_contributed INTEGER NOT NULL, peer TEXT NOT NULL, device TEXT NOT NULL, joined_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, workers INTEGER NOT NULL, tokens INTEGER NOT NULL, train_loss REAL,
    eval_loss REAL, data_plane_bytes INTEGER NOT NULL, seconds REAL NOT NULL, checksum TEXT NOT NULL,
    consistent INTEGER NOT NULL, failed_spans INTEGER NOT NULL, finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trained_shards (
    epoch INTEGER NOT NULL, shard INTEGER NOT NULL, worker_id TEXT NOT NULL, round INTEGER NOT NULL,
    PRIMARY KEY (epoch, shard)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, worker_id TEXT,
    round INTEGER, detail TEXT
);
CREATE TABLE IF NOT EXISTS round_workers (
    round INTEGER NOT NULL, worker_id TEXT NOT NULL, tokens INTEGER NOT NULL,
    compute_seconds REAL NOT NULL, averaging_seconds REAL, PRIMARY KEY (round, worker_id)
);
"""


class RunSpecMismatchError(RuntimeError):
    """The data directory holds a different run; refuse rather than mix two runs' state."""


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


class RunStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- meta ----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def bind_run(self, spec_json: str, spec_sha256: str) -> bool:
        """Tie this database to a run spec; True when resuming the same run, error on another one."""
        known = self.get_meta("run_spec_sha256")
        if known is None:
            with self.transaction():
                self.set_meta("run_spec_json", spec_json)
                self.set_meta("run_spec_sha256", spec_sha256)
            return False
        if known != spec_sha256:
            raise RunSpecMismatchError(
                "the data directory belongs to a run with a different spec; use a new data_dir or restore "
                f"the original config (stored spec: {self.get_meta('run_spec_json')})"
            )
        return True

    # ---- workers -------------------------------------------------------------------------------

    def save_worker(self, r: WorkerRecord) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.worker_id,
                r.name,
                r.slot,
                str(r.state),
                r.rounds_contributed,
                json.dumps(
                    {"peer_id": r.peer.peer_id, "maddrs": r.peer.maddrs, "client_mode": r.peer.client_mode}
                ),
                json.dumps(r.device.__dict__),
                r.joined_at,
            ),
        )

    def load_members(self, membership: Membership, now: float) -> int:
        """Fill `membership` from the database. Active workers get a fresh lease to reconnect in."""
        rows = self.db.execute("SELECT * FROM workers ORDER BY slot").fetchall()
        for worker_id, name, slot, state, contributed, peer, device, _joined in rows:
            p = json.loads(peer)
            record = WorkerRecord(
                worker_id=worker_id,
                name=name,
                peer=PeerDescriptor(p["peer_id"], tuple(p["maddrs"]), p["client_mode"]),
                device=DeviceInfo(**json.loads(device)),
                slot=slot,
                joined_at=now,
                last_seen=now,
                state=WorkerState(state),
                rounds_contributed=contributed,
            )
            membership.workers[worker_id] = record
        membership.next_slot = max((r.slot for r in membership.workers.values()), default=-1) + 1
        return len(rows)

    # ---- rounds --------------------------------------------------------------------------------

    def save_round(self, entry: Any) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.round,
                entry.workers,
                entry.tokens,
                _nan_to_none(entry.train_loss),
                _nan_to_none(entry.eval_loss),
                entry.data_plane_bytes,
                entry.seconds,
                entry.checksum,
                int(entry.consistent),
                entry.failed_spans,
                time.time(),
            ),
        )

    def update_round(self, round_: int, *, eval_loss: float, data_plane_bytes: int, consistent: bool) -> None:
        self.db.execute(
            "UPDATE rounds SET eval_loss = ?, data_plane_bytes = ?, consistent = ? WHERE round = ?",
            (_nan_to_none(eval_loss), data_plane_bytes, int(consistent), round_),
        )

    def load_rounds(self) -> list[dict[str, Any]]:
        cursor = self.db.execute("SELECT * FROM rounds ORDER BY round")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def truncate_after(self, round_: int) -> int:
        """Forget rounds ≥ `round_` (their checkpoint was lost) and the shards they trained."""
        with self.transaction():
            dropped = self.db.execute("DELETE FROM rounds WHERE round >= ?", (round_,)).rowcount
            self.db.execute("DELETE FROM trained_shards WHERE round >= ?", (round_,))
            self.db.execute("DELETE FROM round_workers WHERE round >= ?", (round_,))
        return dropped

    # ---- data ledger ---------------------------------------------------------------------------

    def save_trained(self, shards: list[TrainedShard]) -> None:
        # The primary key (epoch, shard) makes "trained twice in one epoch" impossible to record.
        self.db.executemany(
            "INSERT INTO trained_shards VALUES (?, ?, ?, ?)",
            [(s.epoch, s.shard, s.worker_id, s.round) for s in shards],
        )

    def load_ledger(self, ledger: DataLedger) -> None:
        rows = self.db.execute(
            "SELECT epoch, shard, worker_id, round FROM trained_shards ORDER BY round"
        ).fetchall()
        ledger.history = [TrainedShard(*row) for row in rows]
        ledger.epoch = 0
        ledger.trained, ledger.ahead = {}, []
        for record in ledger.history:
            if record.epoch == ledger.epoch:
                ledger.trained[record.shard] = record
            else:
                ledger.ahead.append(record)
            ledger.advance_if_complete()

    def save_leases(self, ledger: DataLedger) -> None:
        """Open leases survive a restart: a worker mid-round keeps training the shard it was given."""
        self.set_meta("leases", json.dumps([lease.__dict__ for lease in ledger.all_leases()]))

    def load_leases(self, ledger: DataLedger) -> None:
        ledger.leases = {}
        for record in json.loads(self.get_meta("leases") or "[]"):
            lease = Lease(**record)
            ledger.leases.setdefault(lease.worker_id, []).append(lease)
        for held in ledger.leases.values():
            held.sort(key=lambda lease: (lease.round, lease.index))

    def trained_shards(self) -> list[TrainedShard]:
        rows = self.db.execute(
            "SELECT epoch, shard, worker_id, round FROM trained_shards ORDER BY epoch, shard"
        )
        return [TrainedShard(*row) for row in rows.fetchall()]

    # ---- events --------------------------------------------------------------------------------

    def add_event(self, kind: str, worker_id: str = "", round_: int | None = None, detail: str = "") -> None:
        self.db.execute(
            "INSERT INTO events (at, kind, worker_id, round, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), kind, worker_id, round_, detail),
        )

    def event_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())

    def recent_events(self, limit: int) -> list[tuple[float, str, str, int | None, str]]:
        """The newest `limit` events, oldest first: (unix time, kind, worker id, round, detail)."""
        rows = self.db.execute(
            "SELECT at, kind, worker_id, round, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [(at, kind, worker or "", round_, detail or "") for at, kind, worker, round_, detail in rows][
            ::-1
        ]

    # ---- per-worker round timings (the dashboard's timeline) ------------------------------------

    def save_round_workers(self, rows: list[tuple[int, str, int, float, float | None]]) -> None:
        """(round, worker id, tokens, compute seconds, averaging seconds or None), replacing older rows."""
        self.db.executemany("INSERT OR REPLACE INTO round_workers VALUES (?, ?, ?, ?, ?)", rows)

    def load_round_workers(self, since_round: int) -> list[tuple[int, str, int, float, float | None]]:
        return self.db.execute(
            "SELECT round, worker_id, tokens, compute_seconds, averaging_seconds FROM round_workers "
            "WHERE round >= ? ORDER BY round, worker_id",
            (since_round,),
        ).fetchall()
