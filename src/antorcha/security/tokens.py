"""Join and operator tokens, kept hashed in a small SQLite file beside the coordinator's data.

A token reads `ant_<id>_<secret>`: `id` names the row (so lookups need no scan and `token list` can
show it), `secret` is 32 random bytes in URL-safe base64. Only SHA-256 of the secret is stored: the
secret has 256 bits of entropy, so a slow password hash would add nothing, and a stolen database gives
no usable token. The coordinator reads the file on every check, so `antorcha token revoke` from
another process takes effect at the next RPC without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

TOKEN_PREFIX = "ant_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_unix REAL NOT NULL,
    expires_unix REAL,
    revoked_unix REAL
);
"""


class Role(StrEnum):
    WORKER = "worker"
    OPERATOR = "operator"


class TokenError(Exception):
    """A token was refused; the message says why in words a volunteer or operator can act on."""


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    role: Role
    created_unix: float
    expires_unix: float | None
    revoked_unix: float | None

    def refusal(self, now_unix: float) -> str:
        """Why this token cannot be used now ("" = it can)."""
        if self.revoked_unix is not None:
            return f"token {self.id} ({self.name}) was revoked; ask the operator for a new one"
        if self.expires_unix is not None and now_unix >= self.expires_unix:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires_unix))
            return f"token {self.id} ({self.name}) expired at {when}; ask the operator for a new one"
        return ""


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d' or plain seconds → seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise ValueError(f"cannot read duration {text!r}; write e.g. 90s, 30m, 12h or 7d") from None
    if not value > 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return value


def _split(token: str) -> tuple[str, str]:
    if not token:
        raise TokenError("no token given; set [worker] token (ANTORCHA_WORKER__TOKEN) to the join token")
    if not token.startswith(TOKEN_PREFIX) or token.count("_") < 2:
        raise TokenError("malformed token: expected ant_<id>_<secret> as printed by `antorcha token create`")
    token_id, _, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not token_id or not secret or len(token) > 200:
        raise TokenError("malformed token: expected ant_<id>_<secret> as printed by `antorcha token create`")
    return token_id, secret


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def create(
        self, name: str, role: Role = Role.WORKER, ttl_s: float | None = None, now_unix: float | None = None
    ) -> tuple[str, TokenRecord]:
        """Make a token; the plaintext is returned once and never stored."""
        if not name or len(name) > 128:
            raise ValueError("a token needs a name of 1..128 characters (who or what it is for)")
        now = time.time() if now_unix is None else now_unix
        token_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=").replace("_", "-")
        expires = now + ttl_s if ttl_s is not None else None
        self._db.execute(
            "INSERT INTO tokens (id, name, role, secret_sha256, created_unix, expires_unix) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (token_id, name, str(role), _digest(secret), now, expires),
        )
        record = TokenRecord(token_id, name, role, now, expires, None)
        return f"{TOKEN_PREFIX}{token_id}_{secret}", record

    def _row(self, token_id: str) -> tuple[TokenRecord, str] | None:
        row = self._db.execute(
            "SELECT id, name, role, created_unix, expires_unix, revoked_unix, secret_sha256 "
            "FROM tokens WHERE id = ?",
            (token_id,),
        ).fetchone()
        if row is None:
            return None
        return TokenRecord(row[0], row[1], Role(row[2]), row[3], row[4], row[5]), row[6]

    def verify(self, token: str, role: Role, now_unix: float | None = None) -> TokenRecord:
        """The token's record if it is valid for `role` now; TokenError with the reason otherwise."""
        token_id, secret = _split(token)
        found = self._row(token_id)
        # Compare digests even for unknown ids so that timing does not tell which ids exist.
        expected = found[1] if found is not None else _digest("")
        if not hmac.compare_digest(expected, _digest(secret)) or found is None:
            raise TokenError("unknown or wrong token; check it was copied whole from `antorcha token create`")
        record = found[0]
        refusal = record.refusal(time.time() if now_unix is None else now_unix)
        if refusal:
            raise TokenError(refusal)
        if record.role != role:
            raise TokenError(f"token {record.id} is a {record.role} token; this call needs a {role} token")
        return record

    def still_valid(self, token_id: str, now_unix: float | None = None) -> str:
        """Why a token that was valid at Join no longer is ("" = still valid)."""
        found = self._row(token_id)
        if found is None:
            return f"token {token_id} no longer exists"
        return found[0].refusal(time.time() if now_unix is None else now_unix)

    def revoke(self, name_or_id: str, now_unix: float | None = None) -> list[TokenRecord]:
        """Revoke the token with this id, or every live token with this name; returns what was revoked."""
        now = time.time() if now_unix is None else now_unix
        ids = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM tokens WHERE (id = ? OR name = ?) AND revoked_unix IS NULL",
                (name_or_id, name_or_id),
            )
        ]
        for token_id in ids:
            self._db.execute("UPDATE tokens SET revoked_unix = ? WHERE id = ?", (now, token_id))
        return [found[0] for token_id in ids if (found := self._row(token_id)) is not None]

    def list(self) -> list[TokenRecord]:
        rows = self._db.execute(
            "SELECT id, name, role, created_unix, expires_unix, revoked_unix FROM tokens "
            "ORDER BY created_unix"
        ).fetchall()
        return [TokenRecord(r[0], r[1], Role(r[2]), r[3], r[4], r[5]) for r in rows]

    def count(self, role: Role | None = None) -> int:
        if role is None:
            return int(self._db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM tokens WHERE role = ?", (str(role),)).fetchone()[0])
