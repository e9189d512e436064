"""The coordinator's queue of runs: what was submitted, in which order, and how each ended. Kept in
`<data_dir>/queue.sqlite` (in memory without a data_dir) so a restarted coordinator resumes the run that
was training and keeps the rest of the queue.

States: queued → running → finished | cancelled | failed; queued → cancelled. One run is running at a
time. Cancelling a running run lets its round in flight finish (checkpointed) before it ends.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    submitted_unix REAL NOT NULL,
    started_unix REAL NOT NULL DEFAULT 0,
    finished_unix REAL NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    summary_json TEXT NOT NULL DEFAULT ''
);
"""


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


ENDED = {RunState.FINISHED, RunState.CANCELLED, RunState.FAILED}


class DuplicateRunError(ValueError):
    """A run with this run_id was already queued (run ids name checkpoint folders: they are unique)."""


@dataclass(frozen=True)
class RunEntry:
    position: int
    run_id: str
    spec_json: str
    state: RunState
    submitted_unix: float
    started_unix: float
    finished_unix: float
    detail: str
    summary_json: str

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_json) if self.summary_json else {}


class RunQueue:
    def __init__(self, path: str | Path | None) -> None:
        target = ":memory:"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            target = str(path)
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def submit(self, run_id: str, spec_json: str, now_unix: float | None = None) -> RunEntry:
        try:
            self._db.execute(
                "INSERT INTO runs (run_id, spec_json, state, submitted_unix) VALUES (?, ?, ?, ?)",
                (run_id, spec_json, str(RunState.QUEUED), time.time() if now_unix is None else now_unix),
            )
        except sqlite3.IntegrityError:
            raise DuplicateRunError(
                f"a run named {run_id!r} was already submitted to this coordinator; give the new one "
                "another run_id"
            ) from None
        entry = self.get(run_id)
        assert entry is not None
        return entry

    def get(self, run_id: str) -> RunEntry | None:
        row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _entry(row) if row else None

    def all(self) -> list[RunEntry]:
        return [_entry(r) for r in self._db.execute("SELECT * FROM runs ORDER BY position")]

    def running(self) -> RunEntry | None:
        row = self._db.execute(
            "SELECT * FROM runs WHERE state = ? ORDER BY position LIMIT 1", (str(RunState.RUNNING),)
        ).fetchone()
        return _entry(row) if row else None

    def next_queued(self) -> RunEntry | None:
        row = self._db.execute(
            "SELECT * FROM runs WHERE state = ? ORDER BY position LIMIT 1", (str(RunState.QUEUED),)
        ).fetchone()
        return _entry(row) if row else None

    def start(self, run_id: str, now_unix: float | None = None) -> None:
        self._db.execute(
            "UPDATE runs SET state = ?, started_unix = ? WHERE run_id = ?",
            (str(RunState.RUNNING), time.time() if now_unix is None else now_unix, run_id),
        )

    def end(
        self,
        run_id: str,
        state: RunState,
        detail: str = "",
        summary: dict[str, Any] | None = None,
        now_unix: float | None = None,
    ) -> None:
        assert state in ENDED
        self._db.execute(
            "UPDATE runs SET state = ?, finished_unix = ?, detail = ?, summary_json = ? WHERE run_id = ?",
            (
                str(state),
                time.time() if now_unix is None else now_unix,
                detail,
                json.dumps(summary) if summary is not None else "",
                run_id,
            ),
        )

    def request_cancel(self, run_id: str, reason: str) -> tuple[bool, str, RunState | None]:
        """Cancel a queued run now; for a running one, only record the reason (the host stops it)."""
        entry = self.get(run_id)
        if entry is None:
            return False, f"no run {run_id!r} in this coordinator's queue", None
        if entry.state in ENDED:
            return False, f"run {run_id} already ended ({entry.state})", entry.state
        if entry.state == RunState.QUEUED:
            self.end(run_id, RunState.CANCELLED, reason or "cancelled before it started")
            return True, f"run {run_id} cancelled before it started", RunState.CANCELLED
        self._db.execute(
            "UPDATE runs SET detail = ? WHERE run_id = ?", (reason or "cancel requested", run_id)
        )
        return True, f"run {run_id} ends after its round in flight", RunState.RUNNING


def _entry(row: tuple[Any, ...]) -> RunEntry:
    return RunEntry(row[0], row[1], row[2], RunState(row[3]), row[4], row[5], row[6], row[7], row[8])
