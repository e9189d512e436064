"""The data-parallel baseline: real ``torch.distributed`` DDP training that DiLoCo is compared against.

Owns launching ``workers`` rank processes on 127.0.0.1, training the same model on the same corpus as
a DiLoCo run (the run's data and tokenizer through ``load_run_data`` and its model through
``build_run_model``, as the workers and the coordinator do; the same seed, AdamW with the inner
optimizer's betas, warm-up and clipping, because each rank steps through ``InnerTrainer`` itself),
evaluating on rank 0 exactly as the DiLoCo coordinator does, and counting the bytes the gradient
all-reduces move.

Data: rank ``r`` reads shard ``r`` of ``workers`` disjoint shards of the training split (cut as a
DiLoCo run cuts its shards) front to back (``ShardReader``), ``spec.batch_size`` sequences per step.
The global batch is ``workers × batch_size`` and a run of ``steps`` steps trains
``steps × workers × batch_size × seq_len`` tokens, the count of a DiLoCo run of ``workers`` workers ×
``steps`` inner steps. (The count and the
corpus are the same; which windows each side reads is not, since DiLoCo leases finer shards.)

Bytes: a DDP communication hook wraps the default all-reduce and adds up, per rank, the payload of
every gradient bucket, ``numel × element_size`` (4 bytes a parameter per step for fp32 gradients).
What one rank sends is estimated as a bandwidth-optimal ring all-reduce would send it::

    sent_per_rank = 2 (n − 1) / n × payload        (reduce-scatter + all-gather, n ranks)

DDP's one-off parameter (and buffer) broadcast from rank 0 at start is reported apart, as its payload
``Σ numel × element_size``; a broadcast to n ranks moves at least (n − 1) × that in total. With
``isolate_network=True`` (root with ``unshare`` rights) the run happens in a private network namespace
whose loopback carries nothing else, and the bytes ``lo`` really transmitted are read from
``/proc/net/dev``: their ratio to the payload estimate above is the protocol overhead (TCP/IP headers,
gloo framing, the rendezvous store).

Rank processes die with their parent (``PR_SET_PDEATHSIG``) and are killed when any rank fails or the
run times out; a failing rank's traceback is raised in the caller as ``RankFailedError``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fcntl
import inspect
import json
import multiprocessing as mp
import os
import signal
import socket
import struct
import sys
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from antorcha.config import RunSpec
from antorcha.data import ShardReader, eval_batches, evaluate
from antorcha.data.source import load_run_data, shard_reader
from antorcha.diloco.checksum import tensor_checksum
from antorcha.diloco.inner import InnerTrainer
from antorcha.diloco.params import ParamLayout
from antorcha.model.factory import build_run_model

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


class RankFailedError(RuntimeError):
    """A rank process raised or died; ``detail`` holds its traceback (or how it died)."""

    def __init__(self, rank: int, detail: str, pids: tuple[int, ...] = ()) -> None:
        super().__init__(rank, detail, pids)
        self.rank, self.detail, self.pids = rank, detail, pids

    def __str__(self) -> str:
        return f"data-parallel rank {self.rank} failed:\n{self.detail}"


@dataclass
class DataParallelResult:
    """What a data-parallel run reports; ``to_dict()`` is JSON-serializable.

    ``evals`` holds (step, tokens trained by all ranks, eval loss), from step 0. Byte counts are per
    rank over the whole run unless named per step; ``bytes_sent_per_worker`` is the ring estimate
    (module docstring). ``seconds`` is rank 0's time in training steps (no start-up, no evals);
    ``wall_seconds`` runs from starting the ranks to their last report. ``data_passes`` is how many
    times a rank went through its shard (above 1, tokens repeat).
    """

    workers: int
    steps: int
    tokens: int
    model_size: str
    num_parameters: int
    batch_size: int
    seq_len: int
    lr: float
    evals: list[tuple[int, int, float]]
    initial_eval_loss: float
    final_eval_loss: float
    payload_bytes_per_step: int
    payload_bytes_per_worker: int
    bytes_sent_per_worker: int
    initial_broadcast_bytes: int
    data_passes: float
    seconds: float
    eval_seconds: float
    wall_seconds: float
    rank_checksums: list[str]
    method: str
    wire_bytes: int | None = None
    protocol_overhead: float | None = None
    # Rank 0's parameters after training, flat fp32 (only with return_params=True); not serialized.
    final_params: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would deep-copy final_params only to drop it.
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "final_params"}
        data["evals"] = [list(e) for e in self.evals]
        data["rank_checksums"] = list(self.rank_checksums)
        return data


@dataclass(frozen=True)
class _RunOptions:
    """The keyword arguments of ``run_data_parallel`` that every rank shares."""

    eval_every: int
    backend: str | None
    device: str
    threads: int | None
    timeout_s: float
    return_params: bool
    crash_at: tuple[int, int] | None


@dataclass(frozen=True)
class _RankJob:
    """Everything one rank needs but the tokens, which follow over its pipe (see ``_launch``)."""

    spec: RunSpec
    rank: int
    workers: int
    steps: int
    backend: str
    threads: int
    options: _RunOptions
    store_port: int
    parent_pid: int
    vocab_size: int  # the tokenizer's, which the model's vocabulary follows
    token_dtype: torch.dtype  # of the token bytes sent over the pipe


class _BucketCounter:
    """DDP communication hook state: the default mean all-reduce, counting each bucket's payload."""

    def __init__(self) -> None:
        self.payload_bytes = 0

    def hook(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        self.payload_bytes += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(group, bucket)


# DDP checks the hook's annotations against the real classes, which the postponed (string) annotations
# of this module are not until resolved.
_BucketCounter.hook.__annotations__.update(typing.get_type_hints(_BucketCounter.hook))


def ring_bytes_sent(payload_bytes: int, workers: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``payload_bytes``: 2 (n − 1) / n × payload."""
    return round(2 * (workers - 1) * payload_bytes / workers)


def rank_reader(train: torch.Tensor, spec: RunSpec, workers: int, rank: int) -> ShardReader:
    """Rank ``rank``'s batches: its own one of ``workers`` disjoint shards, read in order (shards cut
    as a DiLoCo run cuts them: `spec.data.window_order`)."""
    reader = shard_reader(spec, train, workers)
    reader.start(rank)
    return reader


def module_state_bytes(model: nn.Module) -> int:
    """Payload of DDP's start-up broadcast: every parameter and buffer, once."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def params_checksum(model: nn.Module) -> str:
    """The same checksum DiLoCo replicas compare: sha256 of the flat fp32 parameter vector."""
    return tensor_checksum(ParamLayout.of(model).flatten(model))


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before prctl took effect; then nobody would ever kill us.
    if os.getppid() != parent_pid:
        os._exit(1)


def _eval_steps(steps: int, eval_every: int) -> set[int]:
    marks = set(range(eval_every, steps + 1, eval_every)) if eval_every > 0 else set()
    return marks | {steps}


def _rank_device(device: str, rank: int) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(device)


def _no_forward_buffer_sync() -> dict[str, bool]:
    # The rotary tables are the only buffers and are computed identically on every rank, so
    # re-broadcasting them before every forward would only add traffic to the count. Newer torch
    # renamed the switch (and deprecated the old name); both keep the one sync at construction.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _init_group(job: _RankJob, device: torch.device) -> None:
    timeout = datetime.timedelta(seconds=job.options.timeout_s)
    store = dist.TCPStore(HOST, job.store_port, job.workers, is_master=False, timeout=timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(job.backend, store=store, rank=job.rank, world_size=job.workers, timeout=timeout)


def _wrap_ddp(model: nn.Module, device: torch.device) -> tuple[DistributedDataParallel, _BucketCounter]:
    counter = _BucketCounter()
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, **_no_forward_buffer_sync())
    ddp.register_comm_hook(None, counter.hook)
    return ddp, counter


def _train_loop(
    job: _RankJob, trainer: InnerTrainer, model: nn.Module, eval_set: list[torch.Tensor]
) -> tuple[list[tuple[int, int, float]], float, float]:
    """(evals, training seconds, eval seconds); only a rank given an eval set evaluates."""
    evals = [(0, 0, evaluate(model, eval_set))] if eval_set else []
    marks = _eval_steps(job.steps, job.options.eval_every)
    train_s = eval_s = 0.0
    for step in range(1, job.steps + 1):
        if job.options.crash_at == (job.rank, step):
            raise RuntimeError(f"injected crash at step {step}")
        started = time.perf_counter()
        trainer.step()
        train_s += time.perf_counter() - started
        if eval_set and step in marks:
            started = time.perf_counter()
            tokens = step * job.workers * job.spec.tokens_per_step
            evals.append((step, tokens, evaluate(model, eval_set)))
            eval_s += time.perf_counter() - started
    return evals, train_s, eval_s


def _train_rank(job: _RankJob, train_bytes: bytes, eval_bytes: bytes) -> dict[str, Any]:
    device = _rank_device(job.options.device, job.rank)
    _init_group(job, device)
    spec = job.spec
    train = torch.frombuffer(bytearray(train_bytes), dtype=job.token_dtype)
    model = build_run_model(spec, job.vocab_size).to(device)
    ddp, counter = _wrap_ddp(model, device)
    trainer = InnerTrainer(ddp, spec, rank_reader(train, spec, job.workers, job.rank), device)
    eval_set: list[torch.Tensor] = []
    if eval_bytes:
        eval_tokens = torch.frombuffer(bytearray(eval_bytes), dtype=job.token_dtype)
        eval_set = eval_batches(eval_tokens, spec.seq_len, spec.batch_size, spec.eval_batches)
    evals, train_s, eval_s = _train_loop(job, trainer, model, eval_set)
    report: dict[str, Any] = {
        "checksum": params_checksum(model),
        "payload_bytes": counter.payload_bytes,
        "broadcast_bytes": module_state_bytes(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "evals": evals,
        "seconds": train_s,
        "eval_seconds": eval_s,
    }
    if job.options.return_params and job.rank == 0:
        report["params"] = ParamLayout.of(model).flatten(model).numpy().tobytes()
    return report


def _rank_main(job: _RankJob, conn: Connection) -> None:
    _die_with_parent(job.parent_pid)
    os.environ["OMP_NUM_THREADS"] = str(job.threads)
    torch.set_num_threads(job.threads)
    try:
        train_bytes, eval_bytes = conn.recv_bytes(), conn.recv_bytes()
        conn.send(("ok", _train_rank(job, train_bytes, eval_bytes)))
    except BaseException:
        conn.send(("error", (time.time(), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _kill_all(procs: list[BaseProcess]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(10)


# After a first failure, how long to wait for the other ranks' reports: a peer's death makes the
# others fail too ("connection closed"), and the earliest failure is the cause worth showing.
FAILURE_GRACE_S = 2.0


def _poll_rank(proc: BaseProcess, conn: Connection) -> tuple[str, Any] | None:
    """("ok", report) or ("error", (time, detail)) once the rank has finished; None while it runs."""
    # A report may arrive together with the exit, so the pipe is read before the exit status.
    if conn.poll():
        try:
            return conn.recv()
        except EOFError:
            return "error", (time.time(), "exited without a report")
    if not proc.is_alive():
        return "error", (time.time(), f"process exited with code {proc.exitcode} without a report")
    return None


def _collect(procs: list[BaseProcess], conns: list[Connection], timeout_s: float) -> list[dict[str, Any]]:
    """Each rank's report, in rank order; raises for the rank that failed first, or on timeout."""
    reports: dict[int, dict[str, Any]] = {}
    failures: dict[int, tuple[float, str]] = {}
    pids = tuple(p.pid or 0 for p in procs)
    deadline = time.monotonic() + timeout_s
    while len(reports) + len(failures) < len(procs) and time.monotonic() < deadline:
        pending = [r for r in range(len(procs)) if r not in reports and r not in failures]
        waitables: list[Any] = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        wait(waitables, timeout=max(0.0, deadline - time.monotonic()))
        for rank in pending:
            outcome = _poll_rank(procs[rank], conns[rank])
            if outcome is not None and outcome[0] == "ok":
                reports[rank] = outcome[1]
            elif outcome is not None:
                failures[rank] = outcome[1]
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    if failures:
        rank = min(failures, key=lambda r: failures[r][0])
        raise RankFailedError(rank, failures[rank][1], pids)
    if len(reports) < len(procs):
        pending = [r for r in range(len(procs)) if r not in reports]
        raise RankFailedError(pending[0], f"no report within {timeout_s:.0f} s (ranks {pending})", pids)
    return [reports[r] for r in range(len(procs))]


def _launch(
    jobs: list[_RankJob], train_bytes: bytes, eval_bytes: bytes
) -> tuple[list[BaseProcess], list[Connection]]:
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []
    conns: list[Connection] = []
    for job in jobs:
        ours, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_rank_main, args=(job, theirs), name=f"ddp-rank-{job.rank}", daemon=True)
        proc.start()
        theirs.close()  # a dead child then reads as EOF instead of leaving the pipe open
        procs.append(proc)
        conns.append(ours)
    # The tokens are sent only now: in the spawn arguments, whose write blocks until the child has
    # imported torch, they would make the ranks start one after another instead of together.
    for rank, conn in enumerate(conns):
        with contextlib.suppress(OSError):  # a rank that already died is reported by _collect
            conn.send_bytes(train_bytes)
            conn.send_bytes(eval_bytes if rank == 0 else b"")
    return procs, conns


def _check_device(device: str, backend: str, workers: int) -> None:
    if device == "cuda":
        available = torch.cuda.device_count()
        if backend == "nccl" and workers > available:
            raise ValueError(f"nccl needs one GPU per rank: {workers} ranks, {available} GPUs")
    elif device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _result(
    spec: RunSpec,
    workers: int,
    steps: int,
    backend: str,
    reports: list[dict[str, Any]],
    shard_tokens: int,
    wall_s: float,
) -> DataParallelResult:
    head = reports[0]
    payload = head["payload_bytes"]
    evals: list[tuple[int, int, float]] = head["evals"]
    params = head.get("params")
    return DataParallelResult(
        workers=workers,
        steps=steps,
        tokens=steps * workers * spec.tokens_per_step,
        model_size=spec.model_size,
        num_parameters=head["num_parameters"],
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        lr=spec.inner_lr,
        evals=evals,
        initial_eval_loss=evals[0][2],
        final_eval_loss=evals[-1][2],
        payload_bytes_per_step=payload // steps,
        payload_bytes_per_worker=payload,
        bytes_sent_per_worker=ring_bytes_sent(payload, workers),
        initial_broadcast_bytes=head["broadcast_bytes"],
        data_passes=steps * spec.tokens_per_step / shard_tokens,
        seconds=head["seconds"],
        eval_seconds=head["eval_seconds"],
        wall_seconds=wall_s,
        rank_checksums=[r["checksum"] for r in reports],
        method=f"torch.distributed {backend} DDP, {workers} processes",
        final_params=torch.frombuffer(bytearray(params), dtype=torch.float32) if params else None,
    )


def run_data_parallel(
    spec: RunSpec,
    workers: int,
    steps: int,
    *,
    eval_every: int,
    lr: float | None = None,
    backend: str | None = None,
    device: str = "cpu",
    threads_per_worker: int | None = 1,
    timeout_s: float = 3600.0,
    isolate_network: bool = False,
    return_params: bool = False,
    crash_at: tuple[int, int] | None = None,
) -> DataParallelResult:
    """Train ``spec``'s model with DDP over ``workers`` processes for ``steps`` steps; rank 0 reports.

    ``lr`` overrides ``spec.inner_lr``. ``backend`` defaults to gloo on CPU and nccl on CUDA.
    ``threads_per_worker=None`` takes ``OMP_NUM_THREADS`` (1 when unset). ``eval_every <= 0``
    evaluates only at the start and the end. ``isolate_network`` measures real loopback bytes (see
    the module docstring). ``return_params`` puts rank 0's final parameters in ``final_params``.
    ``crash_at=(rank, step)`` makes that rank raise before that step, to test failure handling.
    Raises ``RankFailedError`` naming the rank when a rank raises, dies or misses ``timeout_s``.
    """
    if workers < 1 or steps < 1:
        raise ValueError(f"workers and steps must be positive, got {workers} and {steps}")
    if lr is not None:
        spec = spec.model_copy(update={"inner_lr": lr})
    options = _RunOptions(eval_every, backend, device, threads_per_worker, timeout_s, return_params, crash_at)
    if isolate_network:
        return _run_isolated(spec, workers, steps, options)
    return _run_here(spec, workers, steps, options)


def _run_here(spec: RunSpec, workers: int, steps: int, options: _RunOptions) -> DataParallelResult:
    backend = options.backend or ("nccl" if options.device == "cuda" else "gloo")
    _check_device(options.device, backend, workers)
    threads = options.threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    data = load_run_data(spec)  # what the DiLoCo workers train on: same spec, same function
    corpus = data.corpus
    # Validates the sharding in the caller, before any process starts.
    smallest = rank_reader(corpus.train, spec, workers, workers - 1)
    shard_tokens = smallest.shard_tokens
    # The parent hosts the rendezvous store on a port the OS picks, so no port can be raced for; it
    # lives until this function returns, after every rank has finished with it.
    store = dist.TCPStore(HOST, 0, workers, is_master=True, wait_for_workers=False)
    jobs = [
        _RankJob(
            spec,
            rank,
            workers,
            steps,
            backend,
            threads,
            options,
            store.port,
            os.getpid(),
            data.vocab_size,
            corpus.train.dtype,
        )
        for rank in range(workers)
    ]
    started = time.perf_counter()
    procs, conns = _launch(jobs, corpus.train.numpy().tobytes(), corpus.eval.numpy().tobytes())
    try:
        reports = _collect(procs, conns, options.timeout_s)
    finally:
        _kill_all(procs)
        for conn in conns:
            conn.close()
    return _result(spec, workers, steps, backend, reports, shard_tokens, time.perf_counter() - started)


def _lo_tx_bytes() -> int:
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])  # 8 receive columns come first
    raise OSError("no lo interface in /proc/self/net/dev")


def _bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def _enter_private_network() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (needs root or CAP_SYS_ADMIN)")
    _bring_up_loopback()


def _isolated_main(
    parent_pid: int, spec: RunSpec, workers: int, steps: int, options: _RunOptions, conn: Connection
) -> None:
    _die_with_parent(parent_pid)
    try:
        _enter_private_network()
        before = _lo_tx_bytes()
        result = _run_here(spec, workers, steps, options)
        result.wire_bytes = _lo_tx_bytes() - before
        expected = result.workers * result.bytes_sent_per_worker
        expected += (result.workers - 1) * result.initial_broadcast_bytes
        result.protocol_overhead = result.wire_bytes / expected if expected else None
        result.method += ", own network namespace"
        conn.send(("ok", result))
    except RankFailedError as e:
        conn.send(("rank", (e.rank, e.detail, e.pids)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run_isolated(spec: RunSpec, workers: int, steps: int, options: _RunOptions) -> DataParallelResult:
    """Run in a spawned helper that enters a new network namespace; its ranks inherit it."""
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    args = (os.getpid(), spec, workers, steps, options, writer)
    # Not a daemon: daemonic processes may not start the ranks. It is still killed below, and by
    # PR_SET_PDEATHSIG if this process dies first.
    helper = ctx.Process(target=_isolated_main, args=args)
    helper.start()
    writer.close()
    try:
        if not wait([reader], timeout=options.timeout_s + 60):
            raise TimeoutError("network-isolated data-parallel run did not finish in time")
        status, payload = reader.recv()
    except EOFError:
        status, payload = "error", f"helper exited with code {helper.exitcode} without a report"
    finally:
        _kill_all([helper])
        reader.close()
    if status == "rank":
        raise RankFailedError(*payload)
    if status != "ok":
        raise RuntimeError(f"network-isolated data-parallel run failed:\n{payload}")
    return payload


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Data-parallel (DDP) baseline; prints the result as JSON.")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model-size", default="nano")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="inner_warmup_steps (RunSpec default if unset)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--corpus-max-bytes", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank; 0 = OMP_NUM_THREADS")
    p.add_argument("--netns", action="store_true", help="own network namespace; report real lo bytes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    args = _parse_args(argv)
    fields: dict[str, Any] = {
        "model_size": args.model_size,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "eval_batches": args.eval_batches,
        "seed": args.seed,
    }
    if args.warmup is not None:
        fields["inner_warmup_steps"] = args.warmup
    if args.corpus_max_bytes is not None:
        fields["corpus_max_bytes"] = args.corpus_max_bytes
    result = run_data_parallel(
        RunSpec(**fields),
        args.workers,
        args.steps,
        eval_every=args.eval_every,
        lr=args.lr,
        device=args.device,
        threads_per_worker=args.threads or None,
        isolate_network=args.netns,
    )
    emit(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
