"""Token claims on real processes: tokens decide averaging weights, so a worker claiming more tokens
than the shards it leased hold is refused (INVALID_ARGUMENT), sits the round out, and the run goes on.

Token-budget rounds: the coordinator leased every shard, so it knows each worker's possible tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from _hostile import run_cluster

from antorcha.coordinator.claims import Claim, claim_refusal

RUN = {
    "run_id": "claims",
    "model_size": "nano",
    "seq_len": 32,
    "batch_size": 4,
    "inner_steps": 8,
    "shard_steps": 2,
    "round_mode": "token_budget",
    "inner_warmup_steps": 2,
    "min_workers": 3,
    "max_rounds": 4,
    "round_deadline_s": 120.0,
    "allreduce_timeout_s": 10.0,
    "eval_batches": 2,
}


def test_claim_rule() -> None:
    ok = Claim(tokens=1000, compute_seconds=2.0, leased_tokens=1024, wall_seconds=3.0, measured_rate=400.0)
    assert claim_refusal(ok, 2.0) == ""
    over_lease = Claim(1025, 2.0, 1024, 3.0, 400.0)
    assert "leased to it in this round hold 1024" in claim_refusal(over_lease, 2.0)
    too_fast = Claim(1000, 2.0, 100_000, 0.1, 100.0)  # 1000 tokens in 0.1 s at a measured 100 tokens/s
    assert "measured throughput" in claim_refusal(too_fast, 2.0)
    too_long = Claim(1000, 60.0, 1024, 5.0, None)
    assert "of compute but its round lasted" in claim_refusal(too_long, 2.0)


@pytest.mark.slow
def test_an_impossible_token_claim_is_refused(tmp_path: Path) -> None:
    plan = [{"round": 1, "phase": "report", "action": "claim_tokens", "factor": 4.0}]
    out = run_cluster(tmp_path, RUN, ("h1", "h2"), {"cheat": plan})
    refusal = "report refused: coordinator refused (INVALID_ARGUMENT): impossible token claim"
    assert refusal in out.logs["cheat"]
    assert out.metric("antorcha_rejected_requests_total", "reason", "impossible_claim") == 1
    rounds = out.status.rounds
    assert [r.round for r in rounds] == [0, 1, 2, 3]
    assert [r.workers for r in rounds] == [3, 2, 3, 3]  # it sat round 1 out and came back
    for name in ("h1", "h2"):
        out.rounds_agree(name, range(4))
    out.rounds_agree("cheat", range(2, 4))
