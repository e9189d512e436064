"""Proof of training by spot checks. In process: the verifier judges real pseudo-gradients from real
inner training on each round's assigned shard; a lazy worker (zero or random Δ) is flagged within 3
checked rounds and an honest one is never flagged in 20. On real processes: the coordinator's wiring
(it reduces the whole vector on checked rounds, checks every worker, evicts a repeatedly failing one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _hostile import SMALL_RUN, run_cluster

from antorcha.config import RunSpec
from antorcha.coordinator.ledger import DataLedger
from antorcha.coordinator.verifier import SpotChecker, judge, measure, should_check
from antorcha.data import BYTE_VOCAB_SIZE, load_stdlib_corpus
from antorcha.data.source import shard_reader
from antorcha.diloco.inner import InnerTrainer
from antorcha.diloco.params import ParamLayout
from antorcha.model import build_model

SPEC = RunSpec(model_size="nano", seq_len=32, batch_size=4, inner_steps=8, inner_warmup_steps=2, seed=3)
BATCHES = SPEC.verify_batches  # as many as the coordinator evaluates


def _batches(tokens: torch.Tensor, num_shards: int, shard: int, n: int) -> list[torch.Tensor]:
    reader = shard_reader(SPEC, tokens, num_shards)  # as the coordinator and the workers cut shards
    reader.start(shard)
    return [reader.next_batch() for _ in range(n)]


def _verdicts(lazy: str, rounds: int) -> tuple[list[bool], list[bool]]:
    """(honest results, lazy results) over `rounds` checked rounds; θ follows the honest worker."""
    corpus = load_stdlib_corpus(1_000_000)
    num_shards = 400
    order = DataLedger(num_shards, seed=SPEC.seed).order(0)
    model = build_model(SPEC.model_size, BYTE_VOCAB_SIZE, SPEC.seq_len, SPEC.seed)
    scratch = build_model(SPEC.model_size, BYTE_VOCAB_SIZE, SPEC.seq_len, SPEC.seed)
    layout = ParamLayout.of(model)
    theta = layout.flatten(model)
    trainer = InnerTrainer(model, SPEC, None, torch.device("cpu"))
    reader = shard_reader(SPEC, corpus.train, num_shards)
    honest, lazy_results = [], []
    for r in range(rounds):
        shard, control_shards = order[2 * r], order[2 * r + 1 : 2 * r + 2] + order[-1 - r : -r or None]
        layout.load_into(model, theta)
        reader.start(shard)
        trainer.sampler = reader
        trainer.run(SPEC.inner_steps)
        delta = theta - layout.flatten(model)
        assigned = _batches(corpus.train, num_shards, shard, BATCHES)
        control = [_batches(corpus.train, num_shards, s, 1)[0] for s in control_shards][:BATCHES]
        honest.append(judge(measure(scratch, layout, theta, delta, assigned, control))[0])
        if lazy == "zero":
            fake = torch.zeros_like(delta)
        else:
            noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(r))
            fake = noise * (delta.norm() / noise.norm())
        lazy_results.append(judge(measure(scratch, layout, theta, fake, assigned, control))[0])
        theta = theta - 0.7 * delta  # the run goes on (outer SGD without momentum is enough here)
    return honest, lazy_results


@pytest.mark.parametrize("lazy", ["zero", "random"])
def test_a_lazy_worker_is_flagged_and_an_honest_one_never(lazy: str) -> None:
    torch.manual_seed(0)
    honest, lazy_results = _verdicts(lazy, rounds=20)
    checker = SpotChecker(fail_limit=3)
    flagged_at = None
    for i, passed in enumerate(lazy_results):
        if checker.record("lazy", passed, "") and flagged_at is None:
            flagged_at = i
    assert flagged_at is not None and flagged_at <= 2  # within 3 checked rounds
    for passed in honest:
        assert not checker.record("honest", passed, "")
    assert all(honest), honest  # not even one false failure in 20 rounds


def test_the_check_draw_is_seeded_and_roughly_the_fraction() -> None:
    draws = [should_check(7, r, 0.25) for r in range(400)]
    assert draws == [should_check(7, r, 0.25) for r in range(400)]
    assert 60 < sum(draws) < 140
    assert not any(should_check(7, r, 0.0) for r in range(50))
    assert all(should_check(7, r, 1.0) for r in range(50))


@pytest.mark.slow
def test_the_coordinator_spot_checks_and_evicts_a_lazy_worker(tmp_path: Path) -> None:
    run = {
        **SMALL_RUN,
        "run_id": "spot",
        "eval_batches": 2,
        "verify_fraction": 1.0,
        "verify_fail_limit": 2,
    }
    plan = [{"round": 0, "phase": "report", "action": "zero", "repeat": True}]
    out = run_cluster(tmp_path, run, ("h1", "h2"), {"lazy": plan})
    evictions = out.events_of("lazy", "evict")
    assert len(evictions) == 1 and "spot checks: failed 2 of its last 2" in evictions[0]["detail"]
    flags = [e for e in out.events_of("lazy", "exclude") if str(e["detail"]).startswith("spot_check:")]
    assert [e["round"] for e in flags] == [1]  # flagged at its second checked round
    honest_failures = 0
    for name in ("h1", "h2"):
        # One check is noisy: an honest Δ can fail one (seen: round 3's shard 133, codec tables whose
        # loss 8 honest steps barely move, in about 1 run in 10, with and without the changes of 2026-11-24).
        # That is why a worker is evicted only at verify_fail_limit failures: never an honest one.
        failed = [e["detail"] for e in out.events_of(name, "spot_check_failed")]
        assert len(failed) <= 1 and not out.events_of(name, "evict"), failed
        honest_failures += len(failed)
        out.rounds_agree(name, range(5))
    # Round r's check runs off the critical path, while round r+1 trains; a group for r+1 formed before
    # the verdict still holds the lazy worker (its Δ is then checked and fails too). The coordinator's
    # single replica thread runs that check before r+1's reduce, so no later round can include it.
    failed_rounds = sorted(e["round"] for e in out.events_of("lazy", "spot_check_failed"))
    assert failed_rounds in ([0, 1], [0, 1, 2]), failed_rounds
    assert out.metric("antorcha_spot_checks_total", "result", "fail") == len(failed_rounds) + honest_failures
    # Checks run after a round's eval, so the last round's may land after the final scrape.
    assert out.metric("antorcha_spot_checks_total", "result", "pass") >= 2 * 4 - honest_failures
    assert out.metric("antorcha_excluded_workers_total", "reason", "spot_check") == 1
    workers = [r.workers for r in out.status.rounds]
    assert workers[:2] == [3, 3] and workers[3:] == [2, 2], workers
    assert workers[2] == (3 if 2 in failed_rounds else 2), (workers, failed_rounds)
