"""The trust rules on their own: token store, signed sessions, replay window, rate limits. The same
rules run in the coordinator (tests/security exercises them over real gRPC)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from antorcha.security.guard import GuardSettings, Refusal, RequestGuard
from antorcha.security.ratelimit import RateLimiter
from antorcha.security.sessions import NonceCache
from antorcha.security.signing import SessionKey
from antorcha.security.tokens import Role, TokenError, TokenStore, parse_duration


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    s = TokenStore(tmp_path / "tokens.sqlite")
    yield s
    s.close()


def test_tokens_are_stored_hashed_and_verified(store: TokenStore, tmp_path: Path) -> None:
    token, record = store.create("alice")
    assert store.verify(token, Role.WORKER).id == record.id
    secret = token.split("_", 2)[2]
    assert secret.encode() not in (tmp_path / "tokens.sqlite").read_bytes()  # only its hash is kept
    with pytest.raises(TokenError, match="unknown or wrong"):
        store.verify(token[:-1] + ("x" if token[-1] != "x" else "y"), Role.WORKER)
    with pytest.raises(TokenError, match="operator token"):
        store.verify(token, Role.OPERATOR)
    with pytest.raises(TokenError, match="malformed"):
        store.verify("hello", Role.WORKER)
    with pytest.raises(TokenError, match="no token"):
        store.verify("", Role.WORKER)


def test_expiry_and_revocation(store: TokenStore) -> None:
    token, _ = store.create("bob", ttl_s=60, now_unix=1000.0)
    assert store.verify(token, Role.WORKER, now_unix=1059.0)
    with pytest.raises(TokenError, match="expired"):
        store.verify(token, Role.WORKER, now_unix=1060.0)
    token2, record2 = store.create("carol")
    assert store.still_valid(record2.id) == ""
    assert [r.id for r in store.revoke("carol")] == [record2.id]
    assert "revoked" in store.still_valid(record2.id)
    with pytest.raises(TokenError, match="revoked"):
        store.verify(token2, Role.WORKER)
    assert store.revoke("carol") == []  # nothing live left under that name
    assert {r.name for r in store.list()} == {"bob", "carol"}


def test_another_process_sees_a_revocation(store: TokenStore) -> None:
    _, record = store.create("dave")
    other = TokenStore(store.path)  # e.g. `antorcha token revoke` while the coordinator runs
    other.revoke(record.id)
    other.close()
    assert "revoked" in store.still_valid(record.id)


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90 and parse_duration("2h") == 7200 and parse_duration("7d") == 604800
    for bad in ("", "soon", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _guard(store: TokenStore, clock: Clock) -> RequestGuard:
    return RequestGuard(GuardSettings(enabled=True, session_ttl_s=100, max_clock_skew_s=30), store, clock)


def _session(guard: RequestGuard, store: TokenStore, clock: Clock) -> tuple[SessionKey, str]:
    token, _ = store.create("w", now_unix=clock.now)
    key = SessionKey()
    record = guard.admit_join(token, key.public_bytes)
    session = guard.open_session("w-1", record, key.public_bytes)
    assert session is not None
    key.session_id = session.session_id
    key.clock_offset_s = clock.now - time.time()
    return key, token


def test_signed_call_checks(store: TokenStore) -> None:
    clock = Clock()
    guard = _guard(store, clock)
    key, _ = _session(guard, store, clock)
    body = b"\x0a\x03w-1"
    meta = dict(key.metadata("Heartbeat", body))
    guard.check_worker_call("Heartbeat", meta, body, "w-1")
    with pytest.raises(Refusal, match="already received"):
        guard.check_worker_call("Heartbeat", meta, body, "w-1")
    with pytest.raises(Refusal, match="signature"):  # signed for another method
        guard.check_worker_call("Leave", dict(key.metadata("Heartbeat", body)), body, "w-1")
    with pytest.raises(Refusal, match="signature"):  # altered body
        guard.check_worker_call("Heartbeat", dict(key.metadata("Heartbeat", body)), body + b"x", "w-1")
    with pytest.raises(Refusal) as refusal:
        guard.check_worker_call("Heartbeat", dict(key.metadata("Heartbeat", b"")), b"", "w-2")
    assert refusal.value.code == "PERMISSION_DENIED"
    with pytest.raises(Refusal, match="needs a session"):
        guard.check_worker_call("Heartbeat", {}, body, "w-1")


def test_sessions_expire_without_heartbeats_and_heartbeats_extend_them(store: TokenStore) -> None:
    clock = Clock()
    guard = _guard(store, clock)
    key, _ = _session(guard, store, clock)
    for _ in range(3):  # 3 × 60 s > the 100 s ttl, but each heartbeat renews it
        clock.now += 60
        key.clock_offset_s += 60
        guard.check_worker_call("Heartbeat", dict(key.metadata("Heartbeat", b"")), b"", "w-1")
    clock.now += 60
    key.clock_offset_s += 60
    guard.check_worker_call("LeaseData", dict(key.metadata("LeaseData", b"")), b"", "w-1")  # no renewal
    clock.now += 50
    key.clock_offset_s += 50
    with pytest.raises(Refusal, match="expired"):
        guard.check_worker_call("LeaseData", dict(key.metadata("LeaseData", b"")), b"", "w-1")


def test_sessions_survive_a_coordinator_restart(store: TokenStore) -> None:
    clock = Clock()
    key, _ = _session(_guard(store, clock), store, clock)
    restarted = _guard(store, clock)  # a new guard over the same token file
    restarted.check_worker_call("Heartbeat", dict(key.metadata("Heartbeat", b"")), b"", "w-1")


def test_revocation_takes_effect_at_the_next_call(store: TokenStore) -> None:
    clock = Clock()
    guard = _guard(store, clock)
    key, _ = _session(guard, store, clock)
    store.revoke("w")
    with pytest.raises(Refusal, match="revoked"):
        guard.check_worker_call("Heartbeat", dict(key.metadata("Heartbeat", b"")), b"", "w-1")
    assert [w for w, _ in guard.drain_revoked()] == ["w-1"]


def test_operator_calls_need_an_operator_token(store: TokenStore) -> None:
    clock = Clock()
    guard = _guard(store, clock)
    operator, _ = store.create("op", Role.OPERATOR, now_unix=clock.now)
    worker, _ = store.create("w", now_unix=clock.now)
    assert guard.check_operator({"authorization": f"Bearer {operator}"}) is not None
    for header in ({}, {"authorization": operator}, {"authorization": f"Bearer {worker}"}):
        with pytest.raises(Refusal) as e:
            guard.check_operator(header)
        assert e.value.code == "UNAUTHENTICATED"


def test_auth_off_lets_calls_through_but_still_rate_limits() -> None:
    guard = RequestGuard(GuardSettings(enabled=False, join_burst=3, join_rate_per_s=0.001), None)
    assert guard.admit_join("", b"") is None
    guard.check_worker_call("Heartbeat", {}, b"", "anyone")
    for _ in range(3):
        guard.rate_limit("Join", "10.0.0.1", "")
    with pytest.raises(Refusal) as e:
        guard.rate_limit("Join", "10.0.0.1", "")
    assert e.value.code == "RESOURCE_EXHAUSTED"
    guard.rate_limit("Join", "10.0.0.2", "")  # another address has its own bucket


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(rate_per_s=2, burst=2)
    assert limiter.allow("k", 0.0) and limiter.allow("k", 0.0)
    assert not limiter.allow("k", 0.1)
    assert limiter.retry_after("k") > 0
    assert limiter.allow("k", 0.6)
    small = RateLimiter(1, 1, max_keys=2)
    for k in ("a", "b", "c"):
        small.allow(k, 0.0)
    assert len(small._buckets) == 2  # bounded under a flood of fresh keys


def test_nonce_cache_forgets_only_outside_the_window() -> None:
    cache = NonceCache(window_s=10)
    assert cache.first_time("n1", 0.0)
    assert not cache.first_time("n1", 15.0)  # still inside 2 × window
    assert cache.first_time("n2", 25.0)
    assert cache.first_time("n1", 25.0)  # forgotten: its time stamp is now refused anyway
