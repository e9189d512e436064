"""The worker's main loop. Training runs in the main thread and never waits on the network except at
the round boundary (report, all-reduce, commit); heartbeats run in a thread of their own.

Per round r:  train H inner steps from θ_r → Δ = θ_r − θ_local → ReportRound (long-poll for the group)
→ all-reduce Δ over hivemind weighted by tokens → outer step on the fp32 CPU master copy → CommitRound
with the checksum of θ_{r+1} (resync from the coordinator if it disagrees).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from antorcha.averaging.hivemind_backend import HivemindBackend
from antorcha.config import RunSpec, WorkerSettings
from antorcha.data import BYTE_VOCAB_SIZE, ShardReader, load_stdlib_corpus
from antorcha.diloco.inner import InnerTrainer
from antorcha.diloco.outer import OuterOptimizer
from antorcha.diloco.params import ParamLayout
from antorcha.diloco.pseudo_gradient import BadPseudoGradientError, pseudo_gradient
from antorcha.diloco.state import GlobalState, decode_state
from antorcha.model import build_model
from antorcha.protocol import Progress
from antorcha.worker.client import CoordinatorClient, CoordinatorRefusedError, JoinInfo
from antorcha.worker.device import describe, pick_device
from antorcha.worker.faults import FaultPlan

log = logging.getLogger(__name__)


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
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                instruction, _, reason = self.client.heartbeat(self.worker_id, self.progress)
            except CoordinatorRefusedError as e:
                log.warning("heartbeat refused: %s", e)
                self.lost_lease.set()
                continue
            except Exception as e:  # the coordinator may be restarting; the lease tells who is gone
                log.warning("heartbeat failed: %s", e)
                continue
            if instruction == "stop":
                log.info("coordinator says stop: %s", reason)
                self.stop_requested.set()

    def halt(self) -> None:
        self._halt.set()


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.stop_signal = threading.Event()
        self.history: list[RoundSummary] = []

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
        # Discover the bootstrap peers on a short-lived channel, then start hivemind (which forks).
        probe = CoordinatorClient(s.coordinator, s.rpc_timeout_s)
        discovered = probe.discover()
        probe.close()
        backend = HivemindBackend(
            initial_peers=list(discovered.bootstrap_maddrs),
            host_maddrs=s.p2p_host_maddrs,
            announce_maddrs=s.p2p_announce_maddrs,
            client_mode=s.client_mode,
        )
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        client = CoordinatorClient(s.coordinator, s.rpc_timeout_s)
        try:
            session = TrainingSession(self, client, backend, pick_device(s.device))
            return session.run()
        finally:
            client.close()
            backend.close()


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
        corpus = load_stdlib_corpus(spec.corpus_max_bytes)
        self.model = build_model(spec.model_size, BYTE_VOCAB_SIZE, spec.seq_len, spec.seed).to(device)
        self.layout = ParamLayout.of(self.model)
        self.faults = FaultPlan.parse(worker.settings.fault_plan)
        self.state = self._download(min_round=info.round)
        self.outer = OuterOptimizer(
            spec.outer_lr, spec.outer_momentum, spec.outer_nesterov, self.state.momentum
        )
        self.corpus = corpus
        self.reader: ShardReader | None = None
        self.trainer = InnerTrainer(self.model, spec, None, device)

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

    def _reader_for(self, round_: int) -> ShardReader:
        """Lease this round's shard from the coordinator's data ledger and read it front to back."""
        lease = self.client.lease_data(self.worker_id, round_)
        if self.reader is None or self.reader.num_shards != lease.num_shards:
            spec = self.spec
            self.reader = ShardReader(self.corpus.train, lease.num_shards, spec.seq_len, spec.batch_size)
        self.reader.start(lease.shard)
        log.info(
            "round=%d training on shard=%d/%d epoch=%d", round_, lease.shard, lease.num_shards, lease.epoch
        )
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

    @property
    def _stopping(self) -> bool:
        return self.worker.stop_signal.is_set() or self.heartbeat.stop_requested.is_set()

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
                    if e.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    log.warning("the coordinator no longer knows this worker (%s); rejoining", e)
                    self.heartbeat.lost_lease.set()
        finally:
            self.heartbeat.halt()
            self._leave()
        return 0

    def _leave(self) -> None:
        if self.heartbeat.stop_requested.is_set():
            return  # the coordinator already considers us gone
        try:
            self.client.leave(self.worker_id, "shutting down" if self.worker.stop_signal.is_set() else "done")
            log.info("left the run cleanly")
        except Exception as e:
            log.warning("could not say goodbye to the coordinator: %s", e)

    def _round(self) -> str:
        """Train, average and commit one round; returns "continue", "resync" or "stop"."""
        spec, round_ = self.spec, self.state.round
        self.trainer.sampler = self._reader_for(round_)
        slowdown = self.worker.settings.slowdown

        def on_step(step: int, tokens: int, loss: float) -> None:
            self.heartbeat.progress = Progress(round_, step, tokens, loss, 0.0)
            self.faults.fire(round_, "train", step)
            if slowdown > 1:  # emulate a slower GPU: idle for the extra share of this step's time
                time.sleep(self.trainer.last_step_seconds * (slowdown - 1))

        stats = self.trainer.run(spec.inner_steps, on_step, should_stop=self.worker.stop_signal.is_set)
        if self.worker.stop_signal.is_set() or stats.steps == 0:
            return "stop"
        rate = stats.tokens / max(stats.seconds, 1e-9)
        self.heartbeat.progress = Progress(round_, stats.steps, stats.tokens, stats.mean_loss, rate)
        try:
            delta = pseudo_gradient(self.state.params, self.layout.flatten(self.model))
        except BadPseudoGradientError as e:  # never send a broken Δ; train the round again from θ_r
            log.error("round=%d local training diverged: %s; resetting to the global state", round_, e)
            self.layout.load_into(self.model, self.state.params)
            return "continue"
        answer = self.client.report_round(
            worker_id=self.worker_id,
            round_=round_,
            tokens=stats.tokens,
            inner_steps=stats.steps,
            loss=stats.mean_loss,
            seconds=stats.seconds,
            wait_s=spec.round_deadline_s + 30,
        )
        if answer.accepted and answer.group is not None and self.faults.fire(round_, "report"):
            delta[0] = float("nan")  # the "nan" action: a buggy or hostile peer's pseudo-gradient
        if not answer.accepted or answer.group is None:
            log.warning(
                "round=%d not averaged: %s; resyncing to round %d", round_, answer.reason, answer.next_round
            )
            self._resync(answer.next_round)
            return "resync"
        on_exchange = (
            (lambda: self.faults.fire(round_, "allreduce")) if self.faults.find(round_, "allreduce") else None
        )
        result = self.backend.all_reduce(answer.group, delta, float(stats.tokens), on_exchange=on_exchange)
        self.outer.step(self.state.params, result.average)
        self.state.round = round_ + 1
        checksum = self.state.checksum
        self.faults.fire(round_, "commit")
        commit = self.client.commit_round(
            worker_id=self.worker_id,
            round_=round_,
            checksum=checksum,
            data_bytes=result.bytes_total,
            seconds=result.seconds,
            failed_spans=result.failed_spans,
            wait_s=2 * spec.allreduce_timeout_s + 60,
        )
        self.worker.history.append(
            RoundSummary(
                round_, stats.tokens, stats.mean_loss, result.bytes_total, checksum, commit.instruction
            )
        )
        log.info(
            "round=%d done tokens=%d loss=%.4f avg_bytes=%d avg_s=%.2f compute_s=%.2f checksum=%s -> %s",
            round_,
            stats.tokens,
            stats.mean_loss,
            result.bytes_total,
            result.seconds,
            stats.seconds,
            checksum[:12],
            commit.instruction,
        )
        if commit.instruction == "resync":
            self._resync(commit.next_round)
        else:
            self.layout.load_into(self.model, self.state.params)
        return commit.instruction
