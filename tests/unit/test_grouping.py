"""The round's averaging group: coordinator first with weight 0, workers weighted by the tokens they
trained; fed to a reducer, the average is the token-weighted mean (what token-budget rounds need)."""

from __future__ import annotations

import torch

from antorcha.averaging import codecs
from antorcha.averaging.base import PeerDescriptor
from antorcha.averaging.reducer import ReduceSession
from antorcha.averaging.spans import span_layout
from antorcha.coordinator.grouping import make_group

COORDINATOR = PeerDescriptor("peer-c", ("/ip4/10.0.0.1/tcp/1",), client_mode=False)
FAST = PeerDescriptor("peer-f", ("/ip4/10.0.0.2/tcp/1",), client_mode=False)
SLOW = PeerDescriptor("peer-s", (), client_mode=True)


def _group(codec: str = "none"):  # type: ignore[no-untyped-def]
    return make_group(
        "run.r3.x", COORDINATOR, [("fast", FAST), ("slow", SLOW)], {"fast": 3000, "slow": 1000}, codec, 5.0
    )


def test_coordinator_first_with_weight_zero_then_workers_weighted_by_tokens() -> None:
    group = _group()
    assert [m.peer_id for m in group.members] == ["peer-c", "peer-f", "peer-s"]
    assert [m.weight for m in group.members] == [0.0, 3000.0, 1000.0]
    assert [m.worker_id for m in group.members] == ["", "fast", "slow"]
    assert [m.reduce_fraction for m in group.members] == [1.0, 1.0, 0.0], "a client-mode peer reduces nothing"
    assert group.codec == "none" and group.timeout_s == 5.0 and group.group_id == "run.r3.x"


def test_the_reduced_average_is_the_token_weighted_mean() -> None:
    group = _group()
    n = 1000
    fast, slow = torch.full((n,), 1.0), torch.full((n,), 5.0)
    results = torch.zeros(n)
    for span in span_layout(n, group):
        if span.length == 0:
            continue
        session = ReduceSession(group, span, now=0.0)
        for peer, values, weight in (
            ("peer-f", fast, 3000.0),
            ("peer-s", slow, 1000.0),
            ("peer-c", None, 0.0),
        ):
            for chunk, (lo, hi) in enumerate(span.chunks()):
                payload = codecs.encode("none", values[lo:hi]) if values is not None else b""
                session.contribute(peer, chunk, weight, payload, hi - lo)
        for chunk, (lo, hi) in enumerate(span.chunks()):
            result = session.results[chunk]
            assert result is not None and result.total_weight == 4000.0
            results[lo:hi] = codecs.decode("none", result.payload, hi - lo)
    assert torch.allclose(results, torch.full((n,), (3 * 1.0 + 1 * 5.0) / 4))
