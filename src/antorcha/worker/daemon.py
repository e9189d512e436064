"""The worker's main loop. Training runs in the main thread and never waits on the network except at
the round boundary (report, all-reduce, commit); heartbeats run in a thread of their own.

Per round r:  lease shards and train them from S_r (H steps, or until the round's token budget is
taken) → Δ = S_r − θ_local (+ the quantisation residual, with error feedback) → ReportRound (long-poll
for the group) → all-reduce Δ over hivemind weighted by tokens → outer step on the fp32 CPU master
copy → CommitRound with the checksum of θ_{r+1} (resync from the coordinator if it disagrees).

The report and the all-reduce run as one task in the averaging thread. Without overlap the main thread
waits for it at once, and S_r = θ_r. With overlap it trains round r+1 meanwhile, from
S_{r+1} = θ_r − Δ_r (the newest global θ plus our own progress not yet averaged in), and the outer
step of round r lands when round r+1's training ends, one round late. Because the report is in the
background too, a fast worker does not wait at round r's group barrier for the slowest one: it only
waits, one round later, for round r's average.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from antorcha.averaging.base import AllReduceResult
from antorcha.averaging.hivemind_backend import HivemindBackend
from antorcha.averaging.robust import AggregationPolicy
from antorcha.config import RunSpec, WorkerSettings
from antorcha.data import ShardReader
from antorcha.data.source import load_run_data, shard_reader
from antorcha.diloco.inner import InnerStats, InnerTrainer
from antorcha.diloco.outer import OuterOptimizer
from antorcha.diloco.params import ParamLayout
from antorcha.diloco.pseudo_gradient import BadPseudoGradientError, all_finite, pseudo_gradient
from antorcha.diloco.state import GlobalState, decode_state
from antorcha.model.factory import build_run_model
from antorcha.netem.links import parse_link
from antorcha.netem.pacer import LinkPacer
from antorcha.protocol import Progress
from antorcha.worker.client import (
    CoordinatorClient,
    CoordinatorRefusedError,
    CoordinatorUnreachableError,
    DataLease,
    JoinInfo,
)
from antorcha.worker.device import describe, pick_device
from antorcha.worker.faults import FaultPlan
from antorcha.worker.observe import WorkerObserver

log = logging.getLogger(__name__)
RUN_ENDS = "the run ends"  # how the coordinator words a lease refused because the run is over
# After SIGTERM an all-reduce in flight gets this long to finish (so our reducer span still serves the
# others if it can) before we leave anyway: a stopping worker should say goodbye in seconds, not minutes.
STOP_GRACE_S = 5.0
WAIT_SLICE_S = 0.5  # how often a wait for an all-reduce looks at the stop signal
# Refusals that are about who we are, not about the round: run() rejoins or exits on them, so a round's
# failure must not swallow them into a resync.
IDENTITY_REFUSALS = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)


@dataclass(frozen=True)
class NotAveraged:
    """The coordinator put this round in no averaging group (report refused, or the group was formed
    without us): why, and the round to resync to."""

    reason: str
    next_round: int


@dataclass(frozen=True)
class PendingAverage:
    """A round whose report and all-reduce run in the background (overlap) or are about to be
    waited for."""

    round: int
    future: Future[AllReduceResult | NotAveraged]
    outgoing: torch.Tensor  # the pseudo-gradient as sent (with error feedback added)
    stats: InnerStats


@dataclass
class RoundSummary:
    round: int
    tokens: int
    train_loss: float
    data_bytes: int
    checksum: str
    instruction: str


class Heartbeat(threading.Thread):
    """Renews the lease and carries progress; turns the coordinator's instructions into flags."""

    def __init__(self, client: CoordinatorClient, worker_id: str, interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.worker_id, self.interval_s = client, worker_id, interval_s
        self.progress = Progress()
        self.stop_requested = threading.Event()
        self.lost_lease = threading.Event()
        self.refusal: CoordinatorRefusedError | None = None  # evicted: the worker must exit
        self._halt = threading.Event()
        self._unreachable_since: float | None = None

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                instruction, _, reason = self.client.heartbeat(self.worker_id, self.progress)
            except CoordinatorRefusedError as e:
                if e.code == grpc.StatusCode.PERMISSION_DENIED:
                    log.error("%s", e)
                    self.refusal = e
                    self.stop_requested.set()
                    return
                log.warning("heartbeat refused: %s", e)
                self.lost_lease.set()
                continue
            except Exception as e:  # the coordinator may be restarting; the lease tells who is gone
                self._unreachable(e)
                continue
            if self._unreachable_since is not None:
                log.warning(
                    "the coordinator answers again after %.0fs", time.monotonic() - self._unreachable_since
                )
                self._unreachable_since = None
            if instruction == "stop":
                log.info("coordinator says stop: %s", reason)
                self.stop_requested.set()

    def _unreachable(self, error: Exception) -> None:
        """Say so once, then every 30 s: a worker cut off from its coordinator keeps training."""
        now = time.monotonic()
        since = self._unreachable_since
        if since is None:
            self._unreachable_since = now
            log.warning(
                "cannot reach the coordinator at %s (%s); training goes on, retrying every %.0fs",
                self.client.address,
                getattr(error, "code", lambda: error)(),
                self.interval_s,
            )
        elif int((now - since) / 30) != int((now - since - self.interval_s) / 30):
            log.warning("the coordinator has not answered for %.0fs; still retrying", now - since)

    def halt(self) -> None:
        self._halt.set()


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.stop_signal = threading.Event()
        self.history: list[RoundSummary] = []
        self.observer = WorkerObserver(settings)  # progress display and metrics

    def _identity_path(self) -> Path | None:
        path = self.settings.identity_file
        return Path(path).expanduser() if path else None

    def _identity(self) -> str:
        path = self._identity_path()
        return path.read_text().strip() if path is not None and path.exists() else ""

    def _remember(self, worker_id: str) -> None:
        path = self._identity_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(worker_id)

    def run(self) -> int:
        """Train until the run finishes, the coordinator says stop, or SIGTERM. Returns an exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_signal.set())
        s = self.settings
        log.info("connecting to the coordinator at %s", s.coordinator)
        # Discover the bootstrap peers on a short-lived channel, then start hivemind (which forks).
        probe = CoordinatorClient(
            s.coordinator,
            min(s.rpc_timeout_s, s.connect_timeout_s),
            on_bytes=self.observer.bytes,
            tls=s.tls,
            tls_ca_file=s.tls_ca_file,
        )
        try:
            discovered = probe.discover(patience_s=s.connect_timeout_s)
        finally:
            probe.close()
        if discovered.tokens_required and not s.token:
            raise CoordinatorRefusedError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the coordinator at {s.coordinator} needs a join token: set [worker] token "
                "(or ANTORCHA_WORKER__TOKEN) to the token the operator gave you",
            )
        backend = HivemindBackend(
            initial_peers=list(discovered.bootstrap_maddrs),
            host_maddrs=s.p2p_host_maddrs,
            announce_maddrs=s.p2p_announce_maddrs,
            client_mode=s.client_mode,
            pacer=LinkPacer.from_spec(parse_link(s.emulate_link)) if s.emulate_link else None,
        )
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        client = CoordinatorClient(
            s.coordinator, s.rpc_timeout_s, on_bytes=self.observer.bytes, tls=s.tls, tls_ca_file=s.tls_ca_file
        )
        try:
            self.observer.start()  # after hivemind forked: its processes must not inherit the metrics socket
            device = pick_device(s.device)
            finished = ""  # the run this worker last trained to its end
            idle = not discovered.run_active and discovered.serves_queue  # an idle fleet: wait for a run
            if idle and not self._wait_for_next_run(client, discovered.run_id):
                return 0
            while True:
                session = TrainingSession(self, client, backend, device)
                code = session.run()
                if code != 0 or self.stop_signal.is_set():
                    return code
                finished = session.spec.run_id
                if not self._wait_for_next_run(client, finished):
                    return 0
        finally:
            client.close()
            backend.close()
            self.observer.close()

    def _wait_for_next_run(self, client: CoordinatorClient, finished: str) -> bool:
        """After a run ended: True once the coordinator trains another run (join it, same process);
        False when it serves no queue (nothing more to do: exit), or stops answering, or on SIGTERM."""
        said = False
        while not self.stop_signal.is_set():
            try:
                found = client.discover(patience_s=min(30.0, self.settings.connect_timeout_s))
            except CoordinatorUnreachableError:
                log.info("the coordinator is gone after run %s ended; exiting", finished)
                return False
            if found.run_active and found.run_id != finished:
                log.info("run %s ended; joining the next run %s", finished, found.run_id)
                return True
            if not found.serves_queue:
                return False
            if not said:
                log.info("run %s ended; waiting for the coordinator's next run", finished)
                said = True
            self.stop_signal.wait(2.0)
        return False


class TrainingSession:
    """One worker's membership in one run: the replica (θ_r, outer momentum), model, data and loop."""

    def __init__(
        self, worker: Worker, client: CoordinatorClient, backend: HivemindBackend, device: torch.device
    ) -> None:
        self.worker, self.client, self.backend, self.device = worker, client, backend, device
        info = self._join("")
        self.worker_id = info.worker_id
        # Heartbeat from the moment we are admitted: loading data and state can outlast a lease.
        self.heartbeat = Heartbeat(client, info.worker_id, info.heartbeat_interval_s)
        self.heartbeat.start()
        self.spec = spec = RunSpec.model_validate_json(info.run_spec_json)
        if spec.sha256() != info.run_spec_sha256:
            raise RuntimeError(
                "run spec hash mismatch: the worker and coordinator disagree on the spec format"
            )
        settings = worker.settings
        data = load_run_data(spec)  # the same tokens as the coordinator's: same spec, same function
        corpus = data.corpus
        self.model = build_run_model(
            spec, data.vocab_size, activation_checkpointing=settings.activation_checkpointing
        ).to(device)
        self.layout = ParamLayout.of(self.model)
        self.faults = FaultPlan.parse(worker.settings.fault_plan)
        # Our reducer aggregates its span as the run spec says (robust aggregation, norm bound).
        backend.policy = AggregationPolicy(
            spec.aggregation, spec.norm_outlier_k, spec.clip_iterations, spec.trim_fraction
        )
        self.state = self._download(min_round=info.round)
        self.outer = OuterOptimizer(
            spec.outer_lr, spec.outer_momentum, spec.outer_nesterov, self.state.momentum
        )
        self.corpus = corpus
        self.reader: ShardReader | None = None
        self.trainer = InnerTrainer(
            self.model,
            spec,
            None,
            device,
            precision=settings.precision,
            micro_batch_size=settings.micro_batch_size,
        )
        self._averager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="averaging")
        self.pending: PendingAverage | None = None
        # Error feedback: what quantisation left out of the last pseudo-gradient we sent.
        self.residual = torch.zeros_like(self.state.params) if spec.error_feedback else None
        self.compute_seconds = 0.0  # in inner steps of committed rounds and of the round in training
        self.first_step_at: float | None = None
        self.last_commit_at: float | None = None
        self.round = self.state.round  # the round being trained; with overlap, one ahead of θ
        self.last_refusal = ""  # why the coordinator last refused us a shard
        self.round_start = self.state.params.clone()  # where this round's local training started

    def _join(self, worker_id: str) -> JoinInfo:
        info = self.client.join(
            name=self.worker.settings.name or socket.gethostname(),
            worker_id=worker_id or self.worker._identity(),
            device=describe(self.device),
            peer=self.backend.peer,
            token=self.worker.settings.token,
        )
        self.worker._remember(info.worker_id)
        log.info("joined worker=%s run=%s round=%d", info.worker_id, info.run_id, info.round)
        return info

    def _reader_for(self, lease: DataLease) -> ShardReader:
        if self.reader is None or self.reader.num_shards != lease.num_shards:
            spec = self.spec
            self.reader = shard_reader(spec, self.corpus.train, lease.num_shards)
        self.reader.start(lease.shard)
        return self.reader

    def _download(self, min_round: int) -> GlobalState:
        start = time.monotonic()
        cut = self.faults.fire(min_round, "download")
        got = self.client.get_state(
            self.worker_id,
            min_round,
            wait_s=self.spec.round_deadline_s + 60,
            cut_after_bytes=cut.bytes if cut is not None else None,
        )
        state = decode_state(self.layout, got.data, self.spec.run_id)
        if got.checksum and got.checksum != state.checksum:
            raise RuntimeError("downloaded state's checksum differs from the coordinator's claim")
        log.info(
            "state synced round=%d bytes=%d seconds=%.2f checksum=%s",
            state.round,
            len(got.data),
            time.monotonic() - start,
            state.checksum[:12],
        )
        self.layout.load_into(self.model, state.params)
        return state

    def _resync(self, min_round: int) -> None:
        self.state = self._download(min_round)
        self.outer.momentum_buffer = self.state.momentum
        # The residual is what quantisation left out of a Δ taken against a θ we no longer have.
        self._zero_residual()
        self._restart_from_global()

    def _zero_residual(self) -> None:
        if self.residual is not None:
            self.residual = torch.zeros_like(self.state.params)

    def _recover_from_divergence(self) -> str:
        """Local training went NaN/Inf: apply round r−1's average if one is pending (it is sound, and
        dropping it would skip an outer step and its commit), then train again from the global θ with
        fresh AdamW moments (the old ones are NaN and would diverge again at once) and no residual (it
        may hold garbage too)."""
        instruction = self._finish_pending()
        self.trainer.reset_optimizer_state()
        self._zero_residual()
        if instruction == "stop":
            return "stop"
        # After a commit θ is of the diverged round, which is trained again; after a resync, the newest.
        self._restart_from_global()
        return "continue"

    def _restart_from_global(self) -> None:
        """Train the next round from the global θ (the local model and any pending average are dropped)."""
        self._drop_pending()
        self.round = self.state.round
        self.round_start = self.state.params.clone()
        self.layout.load_into(self.model, self.round_start)

    @property
    def _stopping(self) -> bool:
        return self.worker.stop_signal.is_set() or self.heartbeat.stop_requested.is_set()

    def _must_stop_now(self) -> bool:
        """SIGTERM, or evicted: stop between inner steps (a finished run ends at the round boundary)."""
        return self.worker.stop_signal.is_set() or self.heartbeat.refusal is not None

    def run(self) -> int:
        try:
            while not self._stopping:
                if self.heartbeat.lost_lease.is_set():  # dropped (e.g. paused too long): rejoin, resync
                    self.heartbeat.lost_lease.clear()
                    info = self._join(self.worker_id)
                    self._resync(info.round)
                try:
                    if self._round() == "stop":
                        break
                except CoordinatorRefusedError as e:
                    if e.code == grpc.StatusCode.PERMISSION_DENIED:  # evicted: exit, without a goodbye
                        self.heartbeat.refusal = e
                        self.heartbeat.stop_requested.set()
                        break
                    # Unknown worker, or a session that expired (e.g. a long pause): join again with
                    # the token; a revoked token is refused at that Join and the worker exits.
                    if e.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                        raise
                    log.warning("the coordinator no longer knows this worker (%s); rejoining", e)
                    self.heartbeat.lost_lease.set()
        finally:
            self._drop_pending()
            self._averager.shutdown(wait=False)
            self.heartbeat.halt()
            self._leave()
            self._write_summary()
        if self.heartbeat.refusal is not None:
            raise self.heartbeat.refusal
        return 0

    def _leave(self) -> None:
        if self.heartbeat.stop_requested.is_set():
            return  # the coordinator already considers us gone
        try:
            self.client.leave(self.worker_id, "shutting down" if self.worker.stop_signal.is_set() else "done")
            log.info("left the run cleanly")
        except Exception as e:
            log.warning("could not say goodbye to the coordinator: %s", e)

    @property
    def wall_seconds(self) -> float:
        """From the first inner step to the last commit (or now, before any commit)."""
        if self.first_step_at is None:
            return 0.0
        return (self.last_commit_at or time.monotonic()) - self.first_step_at

    @property
    def utilisation(self) -> float:
        """Share of wall time spent in inner steps (of the rounds committed so far)."""
        return self.compute_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def _write_summary(self) -> None:
        path = self.worker.settings.summary_file
        if not path:
            return
        summary = {
            "worker_id": self.worker_id,
            "rounds": len(self.worker.history),
            "tokens": sum(h.tokens for h in self.worker.history),
            "compute_seconds": self.compute_seconds,
            "wall_seconds": self.wall_seconds,
            "utilisation": self.utilisation,
            "data_plane_bytes_sent": sum(h.data_bytes for h in self.worker.history),
            "overlap": self.spec.overlap,
            "round_mode": self.spec.round_mode,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2))

    # ---- one round ------------------------------------------------------------------------------

    def _train(self, round_: int) -> InnerStats:
        """Lease shards of `round_` one after the other and train them, until the coordinator says the
        round is full (token budget taken, or the one fixed-H shard done) or we are told to stop."""
        steps = tokens = 0
        seconds = loss_sum = 0.0
        slowdown = self.worker.settings.slowdown
        index = 0
        observer = self.worker.observer
        while not self.worker.stop_signal.is_set():
            lease = self.client.lease_data(self.worker_id, round_, index)
            if lease.wait:  # paused by the operator, or too few workers to open the round
                observer.waiting(round_, lease.reason)
                if self.worker.stop_signal.wait(lease.retry_after_s or 1.0):
                    break
                continue
            if lease.round_full:
                log.debug("round=%d no more shards after %d: %s", round_, index, lease.reason)
                self.last_refusal = lease.reason
                break
            reader = self._reader_for(lease)
            log.info(
                "round=%d shard=%d/%d epoch=%d #%d steps=%d",
                round_,
                lease.shard,
                lease.num_shards,
                lease.epoch,
                index,
                lease.steps,
            )
            self.trainer.sampler = reader
            done_before, tokens_before = steps, tokens

            def on_step(
                step: int,
                shard_tokens: int,
                loss: float,
                done_before: int = done_before,
                tokens_before: int = tokens_before,
                lease: DataLease = lease,
            ) -> None:
                at, seen = done_before + step, tokens_before + shard_tokens
                # Steps to the next sync: this shard's rest, or about H in all when more shards follow.
                left = lease.steps - step
                if not lease.last:
                    left = max(left, self.spec.inner_steps - at)
                step_tokens = self.trainer.last_step_tokens  # counted from the batch it trained
                step_s = self.trainer.last_step_seconds * slowdown  # what the emulated device takes
                rate = observer.step(round_, at, loss, step_s, step_tokens, left)
                self.heartbeat.progress = Progress(round_, at, seen, loss, rate)
                self.faults.fire(round_, "train", at)
                if slowdown > 1:  # emulate a slower GPU: idle for the extra share of this step's time
                    time.sleep(self.trainer.last_step_seconds * (slowdown - 1))

            if self.first_step_at is None:
                self.first_step_at = time.monotonic()
            started = time.monotonic()
            stats = self.trainer.run(lease.steps, on_step, should_stop=self._must_stop_now)
            # Compute time includes the emulated slowdown: it stands for a slower device's step time.
            self.compute_seconds += time.monotonic() - started
            steps, tokens = steps + stats.steps, tokens + stats.tokens
            seconds += stats.seconds
            if stats.steps:
                loss_sum += stats.mean_loss * stats.steps
            index += 1
            if stats.steps < lease.steps or lease.last:
                break
        mean = loss_sum / steps if steps else math.nan
        return InnerStats(steps, tokens, mean, seconds)

    def _round(self) -> str:
        """Train one round, then average it (now, or in the background while the next one trains)
        and commit; returns "continue", "resync" or "stop"."""
        spec, round_ = self.spec, self.round
        stats = self._train(round_)
        if self._must_stop_now():
            return "stop"
        if stats.steps == 0:
            return self._nothing_trained(round_)
        rate = stats.tokens / max(stats.seconds, 1e-9)
        self.heartbeat.progress = Progress(round_, stats.steps, stats.tokens, stats.mean_loss, rate)
        try:
            progress = pseudo_gradient(self.round_start, self.layout.flatten(self.model))
        except BadPseudoGradientError as e:  # never send a broken Δ; train the round again from θ
            log.error("round=%d local training diverged: %s; resetting to the global state", round_, e)
            return self._recover_from_divergence()
        outgoing = progress + self.residual if self.residual is not None and stats.tokens else progress
        if self.pending is not None:  # overlap: round r−1's average has had round r to arrive
            instruction = self._finish_pending()
            if instruction == "stop":
                return "stop"
            if instruction == "resync" and self.state.round != round_:
                return "resync"  # the global state moved past this round; its training is stale
        try:
            outgoing, claimed, norm = self._apply_report_faults(round_, outgoing, stats.tokens)
        except BadPseudoGradientError as e:
            # Δ itself was checked finite, so the residual added to it is what broke: drop it too.
            log.error("round=%d %s; resetting to the global state", round_, e)
            self._zero_residual()
            self._restart_from_global()
            return "continue"
        on_exchange = (
            (lambda: self.faults.fire(round_, "allreduce")) if self.faults.find(round_, "allreduce") else None
        )
        future = self._averager.submit(
            self._report_and_average, round_, stats, claimed, norm, outgoing, on_exchange
        )
        pending = PendingAverage(round_, future, outgoing, stats)
        if spec.overlap:
            # Train round r+1 now, from the newest global θ plus our own progress not yet averaged in.
            self.pending = pending
            self.round = round_ + 1
            self.round_start = self.state.params - progress
            self.layout.load_into(self.model, self.round_start)
            return "continue"
        instruction = self._finish(pending)
        if instruction != "resync":
            self._restart_from_global()
        return instruction

    def _report_and_average(
        self,
        round_: int,
        stats: InnerStats,
        claimed: int,
        norm: float,
        outgoing: torch.Tensor,
        on_exchange: Callable[[], None] | None,
    ) -> AllReduceResult | NotAveraged:
        """In the averaging thread: report the round (long-poll for its group), then all-reduce Δ."""
        try:
            answer = self.client.report_round(
                worker_id=self.worker_id,
                round_=round_,
                tokens=claimed,
                inner_steps=stats.steps,
                loss=stats.mean_loss,
                seconds=stats.seconds,
                wait_s=self.spec.round_deadline_s + 30,
                pseudo_gradient_norm=norm,
            )
        except CoordinatorRefusedError as e:
            if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # Our report itself was refused (e.g. an impossible token claim): we sit this round out.
            return NotAveraged(f"report refused: {e}", round_ + 1)
        if not answer.accepted or answer.group is None:
            return NotAveraged(answer.reason, answer.next_round)
        return self.backend.all_reduce(answer.group, outgoing, float(stats.tokens), on_exchange)

    def _apply_report_faults(
        self, round_: int, outgoing: torch.Tensor, tokens: int
    ) -> tuple[torch.Tensor, int, float]:
        """The Δ to send, the tokens to claim and the ‖Δ‖ to declare: the honest ones, unless the fault
        plan makes this worker hostile or broken this round (tests of the trust checks)."""
        norm = float(torch.linalg.vector_norm(outgoing))
        faults = self.faults.fire_all(round_, "report")
        self.backend.tamper_chunk = None
        for fault in faults:
            if fault.action == "nan":
                outgoing = outgoing.clone()
                outgoing[0] = float("nan")
            elif fault.action == "scale":
                outgoing = torch.mul(outgoing, fault.factor)
            elif fault.action == "zero":
                outgoing = torch.zeros_like(outgoing)
            elif fault.action == "random":
                noise = torch.randn(outgoing.shape, generator=torch.Generator().manual_seed(round_))
                outgoing = noise * (norm / float(torch.linalg.vector_norm(noise)))
            elif fault.action == "shape":
                self.backend.tamper_chunk = lambda values: values[:-1]  # every chunk one element short
            elif fault.action == "claim_tokens":
                tokens = int(tokens * fault.factor)
            if fault.declared:
                norm = float(torch.linalg.vector_norm(outgoing))
        if not faults and (outgoing.shape != self.state.params.shape or not all_finite(outgoing)):
            # Never send a broken Δ (the pseudo-gradient was checked; this guards the residual too).
            raise BadPseudoGradientError(
                f"round {round_}: the pseudo-gradient to send is not finite or wrong-shaped"
            )
        return outgoing, tokens, norm

    def _nothing_trained(self, round_: int) -> str:
        """The coordinator gave no shard of `round_` (it ends the run, or the round is averaging or
        closed without us): finish what is pending, then catch up instead of reporting an empty round."""
        instruction = self._finish_pending()
        if instruction != "continue":
            return instruction
        if self.last_refusal.startswith(RUN_ENDS):
            return "stop"
        log.info("round=%d not open to us (%s); syncing to the newest state", round_, self.last_refusal)
        if self.worker.stop_signal.wait(1.0):
            return "stop"
        self._resync(0)
        return "resync"

    def _finish_pending(self) -> str:
        """Finish the overlapped round whose average is in flight, if any ("continue" if none)."""
        pending, self.pending = self.pending, None
        return "continue" if pending is None else self._finish(pending)

    def _finish(self, pending: PendingAverage) -> str:
        """Wait for a round's all-reduce, apply the outer step to the global θ, commit its checksum."""
        spec, round_ = self.spec, pending.round
        try:
            result = self._wait_for(pending.future)
        except Exception as e:  # the report or the all-reduce failed: one round lost, not the worker
            return self._round_failed(round_, "its report or all-reduce failed", e)
        if result is None:
            log.warning("round=%d stopping: not waiting longer for its all-reduce", round_)
            return "stop"
        if isinstance(result, NotAveraged):
            log.warning(
                "round=%d not averaged: %s; resyncing to round %d", round_, result.reason, result.next_round
            )
            self._resync(result.next_round)
            return "resync"
        averaged_at = time.monotonic()
        average = result.average
        if average.shape != self.state.params.shape or not all_finite(average):
            # A broken average never reaches the model: drop it and take θ_{r+1} from the coordinator.
            log.error("round=%d received average is non-finite or wrong-shaped; resyncing", round_)
            self._resync(round_ + 1)
            return "resync"
        if self.spec.error_feedback and result.sent is not None and pending.stats.tokens:
            self._update_residual(round_, pending.outgoing, result.sent)
        self.outer.step(self.state.params, result.average)
        self.state.round = round_ + 1
        checksum = self.state.checksum
        self.faults.fire(round_, "commit")
        try:
            commit = self.client.commit_round(
                worker_id=self.worker_id,
                round_=round_,
                checksum=checksum,
                data_bytes=result.bytes_sent,
                seconds=result.seconds,
                failed_spans=result.failed_spans,
                wait_s=2 * spec.allreduce_timeout_s + 60,
            )
        except (CoordinatorRefusedError, CoordinatorUnreachableError) as e:  # e.g. the round never closed
            return self._round_failed(round_, "its commit failed", e)
        self.last_commit_at = time.monotonic()
        outer_seconds = result.seconds + self.last_commit_at - averaged_at
        self.worker.observer.round_done(round_, result, outer_seconds, self.utilisation)
        stats = pending.stats
        self.worker.history.append(
            RoundSummary(
                round_, stats.tokens, stats.mean_loss, result.bytes_sent, checksum, commit.instruction
            )
        )
        log.info(
            "round=%d done tokens=%d steps=%d loss=%.4f sent_bytes=%d avg_s=%.2f compute_s=%.2f "
            "utilisation=%.3f checksum=%s -> %s",
            round_,
            stats.tokens,
            stats.steps,
            stats.mean_loss,
            result.bytes_sent,
            result.seconds,
            stats.seconds,
            self.utilisation,
            checksum[:12],
            commit.instruction,
        )
        if commit.instruction == "resync":
            self._resync(commit.next_round)
        return commit.instruction

    def _round_failed(self, round_: int, what: str, error: Exception) -> str:
        """A round's report, all-reduce or commit raised: resync to the coordinator's newest state and
        train on, instead of letting run() re-raise and the worker exit. The newest state, not round_+1:
        a round whose averaging failed may never close, and waiting for it would time out as well.
        Refusals about our identity still reach run(), which rejoins or exits on them."""
        if isinstance(error, CoordinatorRefusedError) and error.code in IDENTITY_REFUSALS:
            raise error
        # A coordinator's answer needs no traceback; anything else (the backend) may be a bug: show it.
        known = isinstance(error, (CoordinatorRefusedError, CoordinatorUnreachableError))
        log.warning("round=%d %s: %s; resyncing to the newest state", round_, what, error, exc_info=not known)
        self._resync(0)
        return "resync"

    def _update_residual(self, round_: int, outgoing: torch.Tensor, sent: torch.Tensor) -> None:
        """Error feedback: keep what quantisation left out of the Δ we sent. A non-finite or
        wrong-shaped value (e.g. |Δ| > 65504 overflowing fp16) would poison every later Δ, and each
        would be refused as non-finite: start the residual over instead."""
        residual = outgoing - sent if sent.shape == outgoing.shape else None
        if residual is None or not all_finite(residual):
            log.warning(
                "round=%d quantisation residual is non-finite or wrong-shaped; resetting it to zero", round_
            )
            self._zero_residual()
            return
        self.residual = residual

    def _wait_for(
        self, future: Future[AllReduceResult | NotAveraged], bound_s: float | None = None
    ) -> AllReduceResult | NotAveraged | None:
        """The future's result (or its exception), waiting at most `bound_s` (None: as long as it
        takes), in slices that notice SIGTERM: from then on it waits at most STOP_GRACE_S more.
        None if it gave up."""
        deadline = math.inf if bound_s is None else time.monotonic() + bound_s
        noticed = False
        while not future.done():
            now = time.monotonic()
            if not noticed and self.worker.stop_signal.is_set():
                noticed = True
                deadline = min(deadline, now + STOP_GRACE_S)
            if now >= deadline:
                return None
            wait([future], timeout=min(WAIT_SLICE_S, deadline - now))
        return future.result()

    def _drop_pending(self) -> None:
        """Let an all-reduce in flight finish (our span's reducer serves the others) and forget it;
        after SIGTERM, for a few seconds only, so that the Leave is not held back."""
        pending, self.pending = getattr(self, "pending", None), None
        if pending is not None:
            try:
                if self._wait_for(pending.future, 3 * self.spec.allreduce_timeout_s + 10) is None:
                    log.warning("round=%d leaving its all-reduce unfinished", pending.round)
            except Exception as e:
                log.warning("round=%d background averaging ended badly: %s", pending.round, e)
