"""Session credentials: what a worker gets at Join and proves it holds on every later call.

A session binds a worker id to the join token that admitted it and to the Ed25519 public key the
worker sent. It expires `ttl_s` after the last heartbeat that renewed it. Sessions are written to the
token database so a restarted coordinator still knows its workers; the nonces of recent requests are
kept in memory only (a request replayed across a coordinator restart, within the clock window, is the
one replay this does not catch; see docs/security.md).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256 TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL,
    token_id TEXT NOT NULL,
    public_key BLOB NOT NULL,
    expires_unix REAL NOT NULL
);
"""


@dataclass
class Session:
    session_id: str
    worker_id: str
    token_id: str
    public_key: bytes
    expires_unix: float


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionTable:
    def __init__(self, db: sqlite3.Connection | None, ttl_s: float) -> None:
        self.db, self.ttl_s = db, ttl_s
        self._by_hash: dict[str, Session] = {}
        if db is not None:
            db.executescript(_SCHEMA)

    def open(self, worker_id: str, token_id: str, public_key: bytes, now_unix: float) -> Session:
        """A new session; the worker's older sessions end (one live session per worker id)."""
        self.close_worker(worker_id)
        session = Session(secrets.token_urlsafe(24), worker_id, token_id, public_key, now_unix + self.ttl_s)
        key = _hash(session.session_id)
        self._by_hash[key] = session
        if self.db is not None:
            self.db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                (key, worker_id, token_id, public_key, session.expires_unix),
            )
        return session

    def get(self, session_id: str, now_unix: float) -> Session | None:
        key = _hash(session_id)
        session = self._by_hash.get(key)
        if session is None and self.db is not None:
            row = self.db.execute(
                "SELECT worker_id, token_id, public_key, expires_unix FROM sessions WHERE id_sha256 = ?",
                (key,),
            ).fetchone()
            if row is not None:
                session = self._by_hash[key] = Session(session_id, row[0], row[1], bytes(row[2]), row[3])
        if session is None or now_unix >= session.expires_unix:
            return None
        return session

    def renew(self, session: Session, now_unix: float) -> None:
        """Push the expiry out; written through only when it moved by more than a tenth of the ttl."""
        expires = now_unix + self.ttl_s
        moved = expires - session.expires_unix
        session.expires_unix = expires
        if self.db is not None and moved > self.ttl_s / 10:
            self.db.execute(
                "UPDATE sessions SET expires_unix = ? WHERE id_sha256 = ?",
                (expires, _hash(session.session_id)),
            )

    def close_worker(self, worker_id: str) -> None:
        for key in [k for k, s in self._by_hash.items() if s.worker_id == worker_id]:
            del self._by_hash[key]
        if self.db is not None:
            self.db.execute("DELETE FROM sessions WHERE worker_id = ?", (worker_id,))

    def prune(self, now_unix: float) -> None:
        for key in [k for k, s in self._by_hash.items() if s.expires_unix <= now_unix]:
            del self._by_hash[key]
        if self.db is not None:
            self.db.execute("DELETE FROM sessions WHERE expires_unix <= ?", (now_unix,))


class NonceCache:
    """Nonces seen within the clock window; a nonce seen twice is a replay."""

    def __init__(self, window_s: float, max_entries: int = 1_000_000) -> None:
        self.window_s, self.max_entries = window_s, max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, nonce: str, now_unix: float) -> bool:
        while self._seen:
            at = next(iter(self._seen.values()))
            if at > now_unix - 2 * self.window_s and len(self._seen) < self.max_entries:
                break
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now_unix
        return True
