"""Who may make which call: one decision per RPC, from the call's method, metadata and raw bytes.

Kinds of method:
- public (Discover): anyone.
- join (Join): a valid worker token; opens a session bound to the worker's public key.
- worker (Heartbeat, Leave, ReportRound, CommitRound, LeaseData, GetState): a live session whose
  signature checks out, time stamp within the clock window, nonce never seen, for the worker id the
  request names, whose token is still valid (revocation takes effect at the next call).
- operator (Pause, Resume, Evict): an operator token (`authorization: Bearer …`).
- read (GetRunStatus): an operator token or a worker session.
Rate limits apply whether auth is on or off: Join per client address, everything else per worker id.

A refusal names the gRPC status code (as a string, so this module needs no gRPC), a reason key counted
by the dashboard, and a message a person can act on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from antorcha.security import signing
from antorcha.security.ratelimit import RateLimiter
from antorcha.security.sessions import NonceCache, Session, SessionTable
from antorcha.security.tokens import Role, TokenError, TokenRecord, TokenStore


class MethodKind(StrEnum):
    PUBLIC = "public"
    JOIN = "join"
    WORKER = "worker"
    OPERATOR = "operator"
    READ = "read"


METHOD_KINDS: dict[str, MethodKind] = {
    "Discover": MethodKind.PUBLIC,
    "Join": MethodKind.JOIN,
    "Heartbeat": MethodKind.WORKER,
    "Leave": MethodKind.WORKER,
    "ReportRound": MethodKind.WORKER,
    "CommitRound": MethodKind.WORKER,
    "LeaseData": MethodKind.WORKER,
    "GetState": MethodKind.WORKER,
    "GetRunStatus": MethodKind.READ,
    "Pause": MethodKind.OPERATOR,
    "Resume": MethodKind.OPERATOR,
    "Evict": MethodKind.OPERATOR,
    "SubmitRun": MethodKind.OPERATOR,
    "CancelRun": MethodKind.OPERATOR,
    "ListRuns": MethodKind.READ,
}


@dataclass(frozen=True)
class Refusal(Exception):
    code: str  # a grpc.StatusCode name
    reason: str  # key counted in antorcha_rejected_requests_total
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class GuardSettings:
    enabled: bool
    session_ttl_s: float = 3600.0
    max_clock_skew_s: float = 120.0
    join_rate_per_s: float = 2.0
    join_burst: int = 20
    worker_rate_per_s: float = 50.0
    worker_burst: int = 200


def _unauthenticated(message: str) -> Refusal:
    return Refusal("UNAUTHENTICATED", "unauthenticated", message)


class RequestGuard:
    def __init__(
        self,
        settings: GuardSettings,
        tokens: TokenStore | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.enabled and tokens is None:
            raise ValueError("auth is on but there is no token store")
        self.settings, self.tokens, self.clock = settings, tokens, clock
        self.sessions = SessionTable(tokens._db if tokens is not None else None, settings.session_ttl_s)
        self.nonces = NonceCache(settings.max_clock_skew_s)
        self.join_limiter = RateLimiter(settings.join_rate_per_s, settings.join_burst)
        self.worker_limiter = RateLimiter(settings.worker_rate_per_s, settings.worker_burst)
        self.revoked_workers: list[tuple[str, str]] = []  # (worker id, why) seen since the last drain

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # ---- rate limits -------------------------------------------------------------------------

    def rate_limit(self, method: str, client_address: str, worker_id: str) -> None:
        now = time.monotonic()
        if METHOD_KINDS.get(method) == MethodKind.JOIN:
            if not self.join_limiter.allow(client_address, now):
                wait = self.join_limiter.retry_after(client_address)
                raise Refusal(
                    "RESOURCE_EXHAUSTED",
                    "rate_limited",
                    f"too many Join calls from {client_address}; retry in {wait:.1f}s",
                )
        elif worker_id and not self.worker_limiter.allow(worker_id, now):
            raise Refusal(
                "RESOURCE_EXHAUSTED",
                "rate_limited",
                f"worker {worker_id} is calling faster than {self.settings.worker_rate_per_s:g}/s; slow down",
            )

    # ---- per kind ----------------------------------------------------------------------------

    def admit_join(self, token: str, public_key: bytes) -> TokenRecord | None:
        """The token that admits this Join (None when auth is off)."""
        if not self.enabled:
            return None
        assert self.tokens is not None
        try:
            record = self.tokens.verify(token, Role.WORKER, self.clock())
        except TokenError as e:
            raise _unauthenticated(str(e)) from None
        if len(public_key) != signing.PUBLIC_KEY_BYTES:
            raise Refusal(
                "INVALID_ARGUMENT",
                "invalid_argument",
                f"session_public_key must be {signing.PUBLIC_KEY_BYTES} raw Ed25519 bytes; this worker is "
                "too old for a coordinator with auth on, upgrade it",
            )
        return record

    def open_session(self, worker_id: str, record: TokenRecord | None, public_key: bytes) -> Session | None:
        if record is None:
            return None
        return self.sessions.open(worker_id, record.id, public_key, self.clock())

    def check_worker_call(
        self, method: str, metadata: Mapping[str, str], body: bytes, worker_id: str
    ) -> Session | None:
        if not self.enabled:
            return None
        now = self.clock()
        try:
            parts = signing.read_signed(metadata)
        except signing.SignatureError as e:
            raise _unauthenticated(str(e)) from None
        if parts is None:
            raise _unauthenticated(f"{method} needs a session: join with a token first")
        session = self.sessions.get(parts.session_id, now)
        if session is None:
            raise _unauthenticated("session unknown or expired; join again with your token")
        try:
            signing.verify(session.public_key, method, parts, body)
        except signing.SignatureError as e:
            raise _unauthenticated(str(e)) from None
        skew = now - parts.stamp
        if abs(skew) > self.settings.max_clock_skew_s:
            raise _unauthenticated(
                f"request time stamp is {skew:+.0f}s off the coordinator's clock (allowed ±"
                f"{self.settings.max_clock_skew_s:.0f}s): a replayed request, or a clock that drifted "
                "(join again to re-learn the offset)"
            )
        if not self.nonces.first_time(parts.nonce, now):
            raise _unauthenticated("this request was already received once: replayed requests are refused")
        if worker_id != session.worker_id:
            raise Refusal(
                "PERMISSION_DENIED",
                "permission_denied",
                f"the session belongs to worker {session.worker_id}, not {worker_id!r}",
            )
        assert self.tokens is not None
        revoked = self.tokens.still_valid(session.token_id, now)
        if revoked:
            self.sessions.close_worker(session.worker_id)
            self.revoked_workers.append((session.worker_id, revoked))
            raise _unauthenticated(revoked)
        if method == "Heartbeat":
            self.sessions.renew(session, now)
        return session

    def check_operator(self, metadata: Mapping[str, str]) -> TokenRecord | None:
        if not self.enabled:
            return None
        assert self.tokens is not None
        header = metadata.get(signing.OPERATOR_KEY, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated(
                "operator calls need an operator token: pass --token or set ANTORCHA_OPERATOR_TOKEN "
                "(make one with `antorcha token create --operator --name you`)"
            )
        try:
            return self.tokens.verify(token.strip(), Role.OPERATOR, self.clock())
        except TokenError as e:
            raise _unauthenticated(str(e)) from None

    def check_read(self, method: str, metadata: Mapping[str, str], body: bytes) -> None:
        """Operator token, or any live worker session."""
        if not self.enabled:
            return
        if signing.SESSION_KEY in metadata:
            try:
                parts = signing.read_signed(metadata)
            except signing.SignatureError as e:
                raise _unauthenticated(str(e)) from None
            session = self.sessions.get(parts.session_id, self.clock()) if parts else None
            if session is None:
                raise _unauthenticated("session unknown or expired; join again with your token")
            self.check_worker_call(method, metadata, body, session.worker_id)
            return
        self.check_operator(metadata)

    def drop_worker(self, worker_id: str) -> None:
        self.sessions.close_worker(worker_id)

    def drain_revoked(self) -> list[tuple[str, str]]:
        out, self.revoked_workers = self.revoked_workers, []
        return out
