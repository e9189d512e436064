"""The reducing side of the all-reduce: weighted sums of chunks and one group's reduce session.

No network: the session is driven directly, inside `asyncio.run` where its events are awaited.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from antorcha.averaging import codecs
from antorcha.averaging.base import AveragingGroup, GroupMember
from antorcha.averaging.reducer import ChunkResult, ReduceSession, RejectedContribution, WeightedChunk
from antorcha.averaging.spans import CHUNK_ELEMENTS, Span

TIMEOUT_S = 30.0


def _group(weights: dict[str, float], codec: str = "none", timeout_s: float = TIMEOUT_S) -> AveragingGroup:
    members = tuple(GroupMember(peer, (), w, 1.0 if w > 0 else 0.0) for peer, w in weights.items())
    return AveragingGroup("g-1", members, codec=codec, timeout_s=timeout_s)


def _vec(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _send(session: ReduceSession, sender: str, values: torch.Tensor, chunk: int = 0) -> None:
    weight = session.group.member(sender).weight
    payload = codecs.encode(session.group.codec, values)
    session.contribute(sender, chunk, weight, payload, values.numel())


def _session(
    weights: dict[str, float], n: int = 16, codec: str = "none", now: float | None = 0.0
) -> ReduceSession:
    return ReduceSession(_group(weights, codec), Span(0, 0, n), now=now)


# ---- WeightedChunk ------------------------------------------------------------------------------------


def test_weighted_chunk_mean_is_the_token_weighted_average() -> None:
    chunk = WeightedChunk(5)
    xs = [torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0])]
    chunk.add("a", xs[0], 3.0)
    chunk.add("b", xs[1], 1.0)
    assert chunk.weight == 4.0
    assert chunk.senders == {"a", "b"}
    assert torch.allclose(chunk.mean(), (3.0 * xs[0] + 1.0 * xs[1]) / 4.0)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (torch.tensor([1.0, float("nan"), 0.0]), "NaN or Inf"),
        (torch.tensor([1.0, float("inf"), 0.0]), "NaN or Inf"),
        (torch.tensor([1.0, 2.0]), "2 elements, expected 3"),
        (torch.zeros(3, 1), "expected 3"),
    ],
    ids=["nan", "inf", "short", "misshapen"],
)
def test_weighted_chunk_refuses_bad_values_and_keeps_its_sum(values: torch.Tensor, match: str) -> None:
    chunk = WeightedChunk(3)
    chunk.add("a", torch.ones(3), 2.0)
    with pytest.raises(RejectedContribution, match=match):
        chunk.add("b", values, 1.0)
    assert chunk.senders == {"a"}
    assert chunk.weight == 2.0
    assert torch.equal(chunk.mean(), torch.ones(3))


def test_weighted_chunk_refuses_a_second_contribution() -> None:
    chunk = WeightedChunk(2)
    chunk.add("a", torch.ones(2), 1.0)
    with pytest.raises(RejectedContribution, match="already"):
        chunk.add("a", torch.zeros(2), 1.0)
    assert chunk.weight == 1.0


# ---- ReduceSession: averaging -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16"])
def test_session_averages_by_the_groups_token_weights(codec: str) -> None:
    weights = {"a": 1000.0, "b": 3000.0, "c": 250.0}
    xs = {peer: _vec(64, seed) for seed, peer in enumerate(weights)}

    async def main() -> ChunkResult:
        session = _session(weights, n=64, codec=codec)
        for peer, x in xs.items():
            _send(session, peer, x)
        return await session.result(0, timeout=1.0)

    result = asyncio.run(main())
    assert result.contributors == 3
    assert result.total_weight == sum(weights.values())
    # What each sender's bytes decode to, averaged by hand in float64:
    sent = {p: codecs.decode(codec, codecs.encode(codec, x), 64).double() for p, x in xs.items()}
    expected = sum(weights[p] * sent[p] for p in xs) / sum(weights.values())
    average = codecs.decode(codec, result.payload, 64).double()
    tolerance = {"none": 1e-6, "fp16": 2e-3, "bf16": 1e-2}[codec]
    assert torch.allclose(average, expected, rtol=tolerance, atol=tolerance)


def test_only_the_groups_weight_counts() -> None:
    """A sender cannot choose its weight: one it was not given is refused (see the ban tests)."""
    session = _session({"a": 1.0, "b": 1.0}, n=4)
    session.contribute("a", 0, 1.0, codecs.encode("none", torch.full((4,), 2.0)), 4)
    session.contribute("b", 0, 1.0, codecs.encode("none", torch.full((4,), 4.0)), 4)
    assert session.done
    result = session.results[0]
    assert result is not None
    assert torch.equal(codecs.decode("none", result.payload, 4), torch.full((4,), 3.0))


def test_chunk_is_final_only_when_every_sender_contributed() -> None:
    session = _session({"a": 1.0, "b": 2.0, "c": 3.0})
    _send(session, "a", _vec(16, 0))
    _send(session, "c", _vec(16, 2))
    assert session.results[0] is None
    assert not session.ready[0].is_set()
    assert not session.done
    _send(session, "b", _vec(16, 1))
    assert session.results[0] is not None
    assert session.ready[0].is_set()
    assert session.done


def test_every_caller_gets_identical_bytes() -> None:
    weights = {"a": 7.0, "b": 11.0, "c": 13.0}

    async def main() -> list[ChunkResult]:
        session = _session(weights, n=1000, codec="bf16")
        waiters = [asyncio.create_task(session.result(0, timeout=2.0)) for _ in weights]
        await asyncio.sleep(0)
        for seed, peer in enumerate(weights):
            assert not any(w.done() for w in waiters)
            _send(session, peer, _vec(1000, seed))
            await asyncio.sleep(0)
        late = await session.result(0, timeout=0.1)
        return [*(await asyncio.gather(*waiters)), late]

    results = asyncio.run(main())
    assert len({r.payload for r in results}) == 1
    assert len(results[0].payload) == 2 * 1000
    assert all(r == results[0] for r in results)


def test_result_times_out_while_a_sender_is_missing() -> None:
    async def main() -> None:
        session = _session({"a": 1.0, "b": 1.0})
        _send(session, "a", _vec(16, 0))
        with pytest.raises(TimeoutError):
            await session.result(0, timeout=0.01)

    asyncio.run(main())


def test_multi_chunk_span_finalizes_chunk_by_chunk() -> None:
    n = CHUNK_ELEMENTS + 100
    session = ReduceSession(_group({"a": 1.0, "b": 3.0}), Span(0, 1000, 1000 + n), now=0.0)
    assert session.chunk_bounds == [(1000, 1000 + CHUNK_ELEMENTS), (1000 + CHUNK_ELEMENTS, 1000 + n)]
    xa, xb = torch.ones(n), torch.full((n,), 5.0)
    _send(session, "a", xa[:CHUNK_ELEMENTS], chunk=0)
    _send(session, "b", xb[:CHUNK_ELEMENTS], chunk=0)
    assert session.results[0] is not None and session.results[1] is None
    _send(session, "b", xb[CHUNK_ELEMENTS:], chunk=1)
    _send(session, "a", xa[CHUNK_ELEMENTS:], chunk=1)
    assert session.done
    for i, size in enumerate((CHUNK_ELEMENTS, 100)):
        result = session.results[i]
        assert result is not None
        assert torch.equal(codecs.decode("none", result.payload, size), torch.full((size,), 4.0))


# ---- ReduceSession: refusals and bans -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_contribution_bans_the_sender_and_the_chunk_goes_on(bad: float) -> None:
    session = _session({"a": 1.0, "b": 1.0, "c": 2.0}, n=4)
    _send(session, "a", torch.full((4,), 1.0))
    poisoned = torch.full((4,), 9.0)
    poisoned[2] = bad
    with pytest.raises(RejectedContribution, match="NaN or Inf"):
        _send(session, "b", poisoned)
    assert "b" in session.banned
    assert session.results[0] is None, "c still owes the chunk"
    _send(session, "c", torch.full((4,), 4.0))
    result = session.results[0]
    assert result is not None
    assert result.contributors == 2
    assert result.total_weight == 3.0
    assert torch.equal(codecs.decode("none", result.payload, 4), torch.full((4,), 3.0))
    with pytest.raises(RejectedContribution, match="excluded"):
        _send(session, "b", torch.ones(4))


def test_ban_of_the_last_missing_sender_finalizes_the_chunk() -> None:
    session = _session({"a": 1.0, "b": 1.0}, n=4)
    _send(session, "a", torch.full((4,), 2.0))
    with pytest.raises(RejectedContribution):
        _send(session, "b", torch.full((4,), float("nan")))
    result = session.results[0]
    assert result is not None and result.contributors == 1
    assert torch.equal(codecs.decode("none", result.payload, 4), torch.full((4,), 2.0))


@pytest.mark.parametrize(
    ("payload_elements", "declared"),
    [(15, 15), (17, 17), (16, 15), (16, 17)],
    ids=["short", "long", "payload-longer-than-declared", "payload-shorter-than-declared"],
)
def test_wrong_size_is_rejected_and_banned(payload_elements: int, declared: int) -> None:
    session = _session({"a": 1.0, "b": 1.0}, n=16)
    payload = codecs.encode("none", torch.ones(payload_elements))
    with pytest.raises(RejectedContribution):
        session.contribute("a", 0, 1.0, payload, declared)
    assert "a" in session.banned
    assert session.chunks[0].senders == set()


@pytest.mark.parametrize("declared", [2.0, 0.0, 1.0 + 1e-6, float("nan")])
def test_weight_other_than_the_groups_is_rejected_and_banned(declared: float) -> None:
    session = _session({"a": 1.0, "b": 1.0}, n=4)
    with pytest.raises(RejectedContribution, match=r"coordinator assigned 1\.0"):
        session.contribute("a", 0, declared, codecs.encode("none", torch.ones(4)), 4)
    assert "a" in session.banned
    assert session.chunks[0].senders == set()
    _send(session, "b", torch.full((4,), 3.0))
    result = session.results[0]
    assert result is not None and result.contributors == 1 and result.total_weight == 1.0


def test_receive_only_member_declaring_a_weight_is_banned() -> None:
    session = _session({"a": 1.0, "r": 0.0}, n=4)
    with pytest.raises(RejectedContribution):
        session.contribute("r", 0, 5.0, codecs.encode("none", torch.ones(4)), 4)
    assert "r" in session.banned
    _send(session, "a", torch.full((4,), 2.0))
    result = session.results[0]
    assert result is not None and result.contributors == 1


def test_duplicate_contribution_is_rejected() -> None:
    session = _session({"a": 1.0, "b": 1.0}, n=4)
    _send(session, "a", torch.full((4,), 2.0))
    with pytest.raises(RejectedContribution, match="already"):
        _send(session, "a", torch.full((4,), 100.0))
    _send(session, "b", torch.full((4,), 4.0))
    result = session.results[0]
    assert result is not None
    assert torch.equal(codecs.decode("none", result.payload, 4), torch.full((4,), 3.0)), "first one counts"
    with pytest.raises(RejectedContribution):
        _send(session, "b", torch.full((4,), 4.0))  # after finalization: too late
    assert result == session.results[0]


def test_non_member_is_rejected_without_effect() -> None:
    session = _session({"a": 1.0}, n=4)
    with pytest.raises(RejectedContribution, match="not a member"):
        session.contribute("mallory", 0, 1.0, codecs.encode("none", torch.ones(4)), 4)
    assert session.banned == {}
    assert session.results[0] is None
    _send(session, "a", torch.ones(4))
    assert session.done


@pytest.mark.parametrize("chunk", [-1, 1, 99])
def test_chunk_out_of_range_is_rejected(chunk: int) -> None:
    session = _session({"a": 1.0}, n=4)
    with pytest.raises(RejectedContribution, match="out of range"):
        session.contribute("a", chunk, 1.0, codecs.encode("none", torch.ones(4)), 4)
    assert session.results[0] is None


# ---- ReduceSession: silence, empty results, receive-only members, serving -----------------------------


def test_silent_sender_is_banned_after_the_timeout() -> None:
    session = _session({"a": 1.0, "b": 1.0, "c": 1.0}, n=4, now=0.0)
    _send(session, "a", torch.full((4,), 1.0))
    _send(session, "b", torch.full((4,), 3.0))
    session.expire_silent_senders(TIMEOUT_S)
    assert session.banned == {}, "exactly the timeout is not yet too long"
    assert session.results[0] is None
    session.expire_silent_senders(TIMEOUT_S + 0.5)
    assert set(session.banned) == {"c"}, "a and b owe nothing"
    assert "sent nothing" in session.banned["c"]
    result = session.results[0]
    assert result is not None and result.contributors == 2
    assert torch.equal(codecs.decode("none", result.payload, 4), torch.full((4,), 2.0))


def test_sender_silent_after_its_first_chunk_is_banned_after_the_timeout() -> None:
    """The session's clock is the one passed in: a sender that sent chunk 0 at t=0 and nothing more
    is as silent at t=timeout+1 as one that never sent anything."""
    n = CHUNK_ELEMENTS + 8
    session = ReduceSession(_group({"a": 1.0, "b": 1.0}), Span(0, 0, n), now=0.0)
    _send(session, "a", torch.ones(CHUNK_ELEMENTS), chunk=0)
    _send(session, "b", torch.ones(CHUNK_ELEMENTS), chunk=0)
    _send(session, "b", torch.ones(8), chunk=1)
    assert session.results[0] is not None and session.results[1] is None
    session.expire_silent_senders(TIMEOUT_S + 1.0)
    assert "a" in session.banned
    assert session.done


def test_all_senders_banned_gives_an_empty_result() -> None:
    async def main() -> ChunkResult:
        session = _session({"a": 1.0, "b": 2.0}, n=8, now=0.0)
        with pytest.raises(RejectedContribution):
            _send(session, "a", torch.full((8,), float("nan")))
        session.expire_silent_senders(TIMEOUT_S + 1.0)
        assert set(session.banned) == {"a", "b"}
        return await session.result(0, timeout=0.1)

    result = asyncio.run(main())
    assert result == ChunkResult(payload=b"", total_weight=0.0, contributors=0)


def test_receive_only_members_never_block_and_never_count() -> None:
    session = _session({"a": 2.0, "r1": 0.0, "r2": 0.0}, n=4, now=0.0)
    # A receive-only member asks with weight 0 and an empty payload: accepted, and no contribution.
    session.contribute("r1", 0, 0.0, b"", 4)
    assert session.results[0] is None
    assert "r1" not in session.banned
    _send(session, "a", torch.full((4,), 5.0))
    result = session.results[0]
    assert result is not None
    assert result.contributors == 1 and result.total_weight == 2.0
    assert torch.equal(codecs.decode("none", result.payload, 4), torch.full((4,), 5.0))
    session.expire_silent_senders(10 * TIMEOUT_S)
    assert session.banned == {}, "receive-only members owe nothing"


def test_receive_only_members_are_not_expired_while_senders_are_pending() -> None:
    session = _session({"a": 1.0, "b": 1.0, "r": 0.0}, n=4, now=0.0)
    _send(session, "a", torch.ones(4))
    session.expire_silent_senders(TIMEOUT_S + 1.0)
    assert set(session.banned) == {"b"}


def test_fully_served_once_every_member_got_every_chunk() -> None:
    n = CHUNK_ELEMENTS + 1
    session = ReduceSession(_group({"a": 1.0, "b": 1.0, "r": 0.0}), Span(0, 0, n), now=0.0)
    assert len(session.chunks) == 2
    for member in ("a", "b", "r"):
        session.mark_served(member, 0)
    assert not session.fully_served.is_set()
    session.mark_served("a", 1)
    session.mark_served("b", 1)
    session.mark_served("outsider", 1)
    assert not session.fully_served.is_set()
    session.mark_served("r", 1)
    assert session.fully_served.is_set()


def test_watch_returns_once_everything_is_final() -> None:
    async def main() -> None:
        session = _session({"a": 1.0, "b": 1.0}, n=4, now=None)  # watch() keeps time.monotonic()
        watcher = asyncio.create_task(session.watch(interval=0.001))
        await asyncio.sleep(0.01)
        assert not watcher.done()
        _send(session, "a", torch.ones(4))
        _send(session, "b", torch.ones(4))
        await asyncio.wait_for(watcher, timeout=1.0)

    asyncio.run(main())
