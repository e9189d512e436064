"""How a worker's training session recovers from a round gone wrong: local divergence (NaN), a failed
report, all-reduce or commit, a broken quantisation residual, and a SIGTERM while an all-reduce hangs.

The session is built without processes or a network: a fake coordinator client, a stub averaging
result, and the real round logic of TrainingSession around them.
"""

from __future__ import annotations

import threading
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch

from antorcha.averaging.base import AllReduceResult
from antorcha.config import RunSpec
from antorcha.diloco.inner import InnerStats, InnerTrainer
from antorcha.diloco.outer import OuterOptimizer
from antorcha.diloco.params import ParamLayout
from antorcha.diloco.state import GlobalState
from antorcha.model.factory import build_run_model
from antorcha.worker import daemon
from antorcha.worker.client import CommitAnswer, CoordinatorRefusedError, CoordinatorUnreachableError
from antorcha.worker.daemon import NotAveraged, PendingAverage, TrainingSession
from antorcha.worker.faults import FaultPlan

CPU = torch.device("cpu")
ROUND = 5  # the round of θ when a test starts


class FixedBatches:
    def __init__(self, seed: int = 0) -> None:
        self.batch = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(seed))

    def next_batch(self) -> torch.Tensor:
        return self.batch


class FakeClient:
    """The coordinator as the round's end sees it: commits, and goodbyes."""

    def __init__(self) -> None:
        self.commits: list[int] = []
        self.leaves: list[tuple[str, str]] = []
        self.commit_error: Exception | None = None

    def commit_round(self, **kw: Any) -> CommitAnswer:
        self.commits.append(kw["round_"])
        if self.commit_error is not None:
            raise self.commit_error
        return CommitAnswer("continue", "ok", kw["round_"] + 1)

    def leave(self, worker_id: str, reason: str) -> None:
        self.leaves.append((worker_id, reason))


def _session(*, overlap: bool = False, error_feedback: bool = False, allreduce_timeout_s: float = 30) -> Any:
    """A TrainingSession on a tiny real model, with everything that talks to others faked."""
    spec = RunSpec(
        seq_len=16,
        batch_size=4,
        inner_warmup_steps=0,
        inner_steps=2,
        seed=3,
        overlap=overlap,
        error_feedback=error_feedback,
        codec="fp16" if error_feedback else "none",
        allreduce_timeout_s=allreduce_timeout_s,
    )
    s: Any = TrainingSession.__new__(TrainingSession)
    s.spec = spec
    s.model = build_run_model(spec, 256)
    s.layout = ParamLayout.of(s.model)
    params = s.layout.flatten(s.model).clone()
    s.state = GlobalState(round=ROUND, params=params, momentum=torch.zeros_like(params))
    s.outer = OuterOptimizer(spec.outer_lr, spec.outer_momentum, spec.outer_nesterov, s.state.momentum)
    s.trainer = InnerTrainer(s.model, spec, FixedBatches(), CPU, precision="fp32")
    s.client = FakeClient()
    s.faults = FaultPlan([])
    s.worker = types.SimpleNamespace(
        stop_signal=threading.Event(),
        history=[],
        settings=types.SimpleNamespace(summary_file="", slowdown=1.0),
        observer=types.SimpleNamespace(round_done=lambda *a: None),
    )
    s.heartbeat = types.SimpleNamespace(
        progress=None,
        stop_requested=threading.Event(),
        lost_lease=threading.Event(),
        refusal=None,
        halt=lambda: None,
    )
    s.backend = types.SimpleNamespace(tamper_chunk=None)
    s._averager = ThreadPoolExecutor(max_workers=1)
    s.pending = None
    s.residual = torch.zeros_like(params) if error_feedback else None
    s.compute_seconds, s.first_step_at, s.last_commit_at, s.last_refusal = 0.0, None, None, ""
    s.worker_id = "w"
    s.round = ROUND
    s.round_start = params.clone()
    s.layout.load_into(s.model, s.round_start)
    s.downloads = []

    def download(min_round: int) -> GlobalState:
        """The coordinator's newest state: θ of round ROUND + 3, all zeros (easy to recognise)."""
        s.downloads.append(min_round)
        n = s.state.params.numel()
        return GlobalState(round=max(min_round, ROUND + 3), params=torch.zeros(n), momentum=torch.zeros(n))

    s._download = download
    return s


def _train_for_real(s: Any, poison: bool) -> None:
    """Make the session's `_train` run real inner steps, after turning one weight NaN when `poison`."""

    def train(round_: int) -> InnerStats:
        if poison:
            with torch.no_grad():
                next(s.model.parameters()).view(-1)[0] = float("nan")
        return s.trainer.run(s.spec.inner_steps)

    s._train = train


def _average_is_own_delta(s: Any) -> None:
    """A lone worker: the round's average is exactly the Δ it sent (report and all-reduce stubbed)."""

    def report_and_average(
        round_: int, stats: InnerStats, claimed: int, norm: float, outgoing: torch.Tensor, on_exchange: Any
    ) -> AllReduceResult:
        return AllReduceResult(average=outgoing.clone(), sent=outgoing.clone())

    s._report_and_average = report_and_average


def _done(value: AllReduceResult | NotAveraged) -> Future[AllReduceResult | NotAveraged]:
    future: Future[AllReduceResult | NotAveraged] = Future()
    future.set_result(value)
    return future


def _failed(error: Exception) -> Future[AllReduceResult | NotAveraged]:
    future: Future[AllReduceResult | NotAveraged] = Future()
    future.set_exception(error)
    return future


def _pending(s: Any, future: Future[AllReduceResult | NotAveraged], round_: int = ROUND) -> PendingAverage:
    outgoing = torch.full_like(s.state.params, 1e-3)
    return PendingAverage(round_, future, outgoing, InnerStats(2, 64, 5.0, 0.1))


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ---- 1. divergence: fresh AdamW moments, so the next round trains ---------------------------------


def test_after_a_divergence_the_next_round_trains_finite() -> None:
    s = _session(error_feedback=True)
    s.residual = torch.full_like(s.state.params, float("nan"))  # garbage, as a diverged round may leave
    _train_for_real(s, poison=True)
    assert s._round() == "continue"
    assert s.client.commits == []  # a broken Δ is never reported
    assert s.round == ROUND and s.state.round == ROUND
    assert _finite(s.layout.flatten(s.model))  # back at the global θ
    assert not s.trainer.optimizer.state  # the NaN moments are gone
    assert s.trainer.total_steps == 2  # the lr schedule goes on
    assert s.residual is not None and not bool(s.residual.any())

    _train_for_real(s, poison=False)
    _average_is_own_delta(s)
    assert s._round() == "continue"
    assert s.client.commits == [ROUND]
    assert s.state.round == ROUND + 1
    assert _finite(s.state.params) and _finite(s.layout.flatten(s.model))


def test_without_the_reset_the_nan_moments_diverge_again() -> None:
    """Why the reset is needed: AdamW moments that saw a NaN gradient turn a clean θ NaN at once."""
    s = _session()
    _train_for_real(s, poison=True)
    s._train(ROUND)
    s.layout.load_into(s.model, s.state.params)  # the old recovery: reload θ, keep the optimizer
    s.trainer.run(1)
    assert not _finite(s.layout.flatten(s.model))


# ---- 2. divergence with overlap: round r−1's pending average is still applied and committed ----------


def test_a_divergence_with_overlap_still_commits_the_pending_round() -> None:
    s = _session(overlap=True)
    theta = s.state.params.clone()
    average = torch.full_like(theta, 1e-3)
    s.pending = _pending(s, _done(AllReduceResult(average=average)))
    s.round = ROUND + 1  # training round r+1 while round r averages
    _train_for_real(s, poison=True)
    assert s._round() == "continue"
    assert s.client.commits == [ROUND]  # round r's outer step landed and was committed
    assert [h.round for h in s.worker.history] == [ROUND]
    assert s.pending is None
    assert s.state.round == ROUND + 1 and s.round == ROUND + 1  # round r+1 is trained again, from θ_{r+1}
    assert not torch.equal(s.state.params, theta)
    assert torch.equal(s.layout.flatten(s.model), s.state.params)
    assert not s.trainer.optimizer.state


# ---- 3. a failed report, all-reduce or commit resyncs instead of crashing the worker --------------


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("averaging peers vanished"),
        TimeoutError("all-reduce timed out"),
        CoordinatorRefusedError(grpc.StatusCode.FAILED_PRECONDITION, "round 5 is not open"),
        CoordinatorUnreachableError("no answer after 4 attempts"),
    ],
)
def test_a_failed_report_or_all_reduce_resyncs(error: Exception) -> None:
    s = _session()
    assert s._finish(_pending(s, _failed(error))) == "resync"
    assert s.downloads == [0]  # the newest state: a failed round may never close
    assert s.client.commits == []
    assert s.state.round == ROUND + 3 and s.round == ROUND + 3


@pytest.mark.parametrize(
    "error",
    [
        CoordinatorUnreachableError("DEADLINE_EXCEEDED: round did not close in time"),
        CoordinatorRefusedError(grpc.StatusCode.FAILED_PRECONDITION, "round 5 is closed"),
    ],
)
def test_a_failed_commit_resyncs(error: Exception) -> None:
    s = _session()
    s.client.commit_error = error
    averaged = AllReduceResult(average=torch.zeros_like(s.state.params))
    assert s._finish(_pending(s, _done(averaged))) == "resync"
    assert s.client.commits == [ROUND]
    assert s.downloads == [0]
    assert s.state.round == ROUND + 3 and s.round == ROUND + 3
    assert s.worker.history == []


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED]
)
def test_identity_refusals_still_reach_run(code: grpc.StatusCode) -> None:
    """run() rejoins or exits on these; a resync would hide them."""
    s = _session()
    with pytest.raises(CoordinatorRefusedError):
        s._finish(_pending(s, _failed(CoordinatorRefusedError(code, "who are you"))))
    s.client.commit_error = CoordinatorRefusedError(code, "who are you")
    with pytest.raises(CoordinatorRefusedError):
        s._finish(_pending(s, _done(AllReduceResult(average=torch.zeros_like(s.state.params)))))
    assert s.downloads == []


# ---- 4. SIGTERM: the goodbye is not held back by an all-reduce that hangs ---------------------------


def test_sigterm_with_a_hung_all_reduce_leaves_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "STOP_GRACE_S", 0.5)
    s = _session(overlap=True, allreduce_timeout_s=30.0)  # the unbounded wait would be 100 s
    s.pending = _pending(s, Future())  # never completes
    s.worker.stop_signal.set()
    started = time.monotonic()
    assert s.run() == 0
    assert time.monotonic() - started < 3.0
    assert s.client.leaves == [("w", "shutting down")]


def test_sigterm_during_the_wait_for_an_average_stops_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "STOP_GRACE_S", 0.5)
    s = _session()
    threading.Timer(0.2, s.worker.stop_signal.set).start()
    started = time.monotonic()
    assert s._finish(_pending(s, Future())) == "stop"
    assert time.monotonic() - started < 3.0
    assert s.client.commits == []


def test_without_sigterm_an_in_flight_all_reduce_is_let_finish() -> None:
    """The run simply ended: our reducer span still serves the others, so the all-reduce is awaited."""
    s = _session()
    future: Future[AllReduceResult | NotAveraged] = Future()
    s.pending = _pending(s, future)
    threading.Timer(1.2, future.set_result, [AllReduceResult(average=torch.zeros(1))]).start()
    s._drop_pending()
    assert future.done()


# ---- 5. the error-feedback residual stays finite and belongs to our θ -----------------------------


def test_a_finite_sent_vector_keeps_the_residual() -> None:
    s = _session(error_feedback=True)
    pending = _pending(s, Future())
    sent = pending.outgoing.half().float()
    pending.future.set_result(AllReduceResult(average=sent, sent=sent))
    assert s._finish(pending) == "continue"
    assert torch.equal(s.residual, pending.outgoing - sent)


@pytest.mark.parametrize("broken", ["inf", "shape"])
def test_a_broken_sent_vector_resets_the_residual(broken: str) -> None:
    s = _session(error_feedback=True)
    s.residual = torch.ones_like(s.state.params)
    pending = _pending(s, Future())
    if broken == "inf":  # |Δ| > 65504 in fp16
        sent = pending.outgoing.clone()
        sent[3] = float("inf")
    else:
        sent = pending.outgoing[:-1].clone()
    pending.future.set_result(AllReduceResult(average=pending.outgoing.clone(), sent=sent))
    assert s._finish(pending) == "continue"
    assert s.client.commits == [ROUND]
    assert s.residual.shape == s.state.params.shape and not bool(s.residual.any())


def test_a_resync_resets_the_residual() -> None:
    s = _session(error_feedback=True)
    s.residual = torch.ones_like(s.state.params)
    s._resync(0)
    assert s.state.round == ROUND + 3
    assert s.residual.shape == s.state.params.shape and not bool(s.residual.any())


def test_a_commit_does_not_reset_the_residual() -> None:
    """Without overlap every committed round restarts from the global θ; error feedback must survive."""
    s = _session(error_feedback=True)
    _train_for_real(s, poison=False)
    _average_is_own_delta(s)

    def lossy(
        round_: int, stats: InnerStats, claimed: int, norm: float, outgoing: torch.Tensor, on_exchange: Any
    ) -> AllReduceResult:
        sent = outgoing.half().float()
        return AllReduceResult(average=sent, sent=sent)

    s._report_and_average = lossy
    assert s._round() == "continue"
    assert s.client.commits == [ROUND]
    assert bool(s.residual.any())
