"""The DDP baseline with real rank processes: it learns, counts its bytes, keeps ranks in sync with
single-process training on the combined batch, and leaves no process behind when a rank or the
caller dies."""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _tiny_models import TINY_LLAMA

from antorcha.config import DataSpec, RunSpec
from antorcha.data import BYTE_VOCAB_SIZE, eval_batches, evaluate, load_stdlib_corpus
from antorcha.data.source import load_run_data
from antorcha.diloco.inner import InnerTrainer
from antorcha.diloco.params import ParamLayout
from antorcha.experiments.baseline import (
    DataParallelResult,
    RankFailedError,
    rank_reader,
    ring_bytes_sent,
    run_data_parallel,
)
from antorcha.model import build_model, count_parameters
from antorcha.model.factory import build_run_model

pytestmark = pytest.mark.slow

SPEC = RunSpec(
    model_size="nano",
    seq_len=32,
    batch_size=4,
    inner_lr=3e-3,
    inner_warmup_steps=2,
    eval_batches=4,
    corpus_max_bytes=200_000,
)
STEPS = 8


@pytest.fixture(scope="module")
def two_ranks() -> DataParallelResult:
    return run_data_parallel(SPEC, 2, STEPS, eval_every=4, return_params=True, timeout_s=240)


def _pid_alive(pid: int) -> bool:
    # A zombie has exited; only its parent's wait is missing.
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _spawned_children(pid: int) -> list[int]:
    """Live multiprocessing-spawned children of ``pid`` (not its resource tracker, which is
    multiprocessing's own and leaves with its parent)."""
    children = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status and b"spawn_main" in cmdline and _pid_alive(int(proc.name)):
            children.append(int(proc.name))
    return children


class _Concat:
    """One batch made of both ranks' batches: what the two ranks see together in one DDP step."""

    def __init__(self, *readers: object) -> None:
        self.readers = readers

    def next_batch(self) -> torch.Tensor:
        return torch.cat([r.next_batch() for r in self.readers])  # type: ignore[attr-defined]


def test_two_ranks_learn_and_count_ring_bytes(two_ranks: DataParallelResult) -> None:
    r = two_ranks
    assert (r.workers, r.steps) == (2, STEPS)
    assert r.tokens == STEPS * 2 * SPEC.batch_size * SPEC.seq_len
    assert [(step, tokens) for step, tokens, _ in r.evals] == [
        (0, 0),
        (4, r.tokens // 2),
        (STEPS, r.tokens),
    ]
    assert r.final_eval_loss < r.initial_eval_loss - 0.3
    assert r.final_eval_loss == r.evals[-1][2]
    params = count_parameters(build_model(SPEC.model_size, BYTE_VOCAB_SIZE, SPEC.seq_len, SPEC.seed))
    assert r.num_parameters == params
    assert r.payload_bytes_per_step == 4 * params  # every parameter is trainable fp32
    n = r.workers
    assert r.bytes_sent_per_worker == STEPS * 2 * (n - 1) / n * 4 * params
    assert r.initial_broadcast_bytes >= 4 * params
    assert r.method == "torch.distributed gloo DDP, 2 processes"
    assert r.seconds > 0 and r.wall_seconds > r.seconds
    assert 0 < r.data_passes < 1
    d = r.to_dict()
    assert "final_params" not in d
    assert d["evals"][0] == [0, 0, r.initial_eval_loss]


def test_ranks_stay_identical_and_match_one_process_on_the_combined_batch(
    two_ranks: DataParallelResult,
) -> None:
    assert len(set(two_ranks.rank_checksums)) == 1
    corpus = load_stdlib_corpus(SPEC.corpus_max_bytes)
    reference_spec = SPEC.model_copy(update={"batch_size": 2 * SPEC.batch_size})
    model = build_model(SPEC.model_size, BYTE_VOCAB_SIZE, SPEC.seq_len, SPEC.seed)
    batches = _Concat(*(rank_reader(corpus.train, SPEC, 2, rank) for rank in range(2)))
    trainer = InnerTrainer(model, reference_spec, batches, torch.device("cpu"))
    for _ in range(STEPS):
        trainer.step()
    expected = ParamLayout.of(model).flatten(model)
    assert two_ranks.final_params is not None
    # Not bitwise: the mean over 2B sequences is summed in another order than two means of B.
    assert torch.allclose(two_ranks.final_params, expected, rtol=0, atol=1e-5)
    initial = build_model(SPEC.model_size, BYTE_VOCAB_SIZE, SPEC.seq_len, SPEC.seed)
    assert not torch.allclose(expected, ParamLayout.of(initial).flatten(initial), rtol=0, atol=1e-3)


WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "big", "red", "and", "then"]


def _local_text(path: Path, count: int = 400) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _local_tokenizer(directory: Path, text: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE trained on ``text`` and saved as a transformers tokenizer directory (offline)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.read_text().splitlines(), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return directory


def _direct_initial_eval(spec: RunSpec) -> tuple[float, int, int]:
    """(initial eval loss, vocab size, parameters) of the run, as the DiLoCo coordinator computes them."""
    data = load_run_data(spec)
    model = build_run_model(spec, data.vocab_size)
    held_out = eval_batches(data.corpus.eval, spec.seq_len, spec.batch_size, spec.eval_batches)
    return evaluate(model, held_out), data.vocab_size, count_parameters(model)


def test_the_baseline_trains_the_runs_own_data_and_tokenizer(tmp_path: Path, hf_offline: None) -> None:
    """A local text file and a local BPE tokenizer: the ranks train exactly those tokens with a model
    of that vocabulary, as the DiLoCo workers would (not the built-in corpus with 256 byte ids)."""
    text = _local_text(tmp_path / "story.txt")
    tokenizer = _local_tokenizer(tmp_path / "tok", text)
    spec = SPEC.model_copy(
        update={
            "tokenizer": str(tokenizer),
            "data": DataSpec(source="text", paths=[str(text)], eval_fraction=0.2),
        }
    )
    steps = 3
    r = run_data_parallel(spec, 2, steps, eval_every=0, return_params=True, timeout_s=240)
    initial, vocab, params = _direct_initial_eval(spec)
    assert 256 < vocab <= 320
    byte_model = build_model(SPEC.model_size, BYTE_VOCAB_SIZE, SPEC.seq_len, SPEC.seed)
    assert r.num_parameters == params != count_parameters(byte_model)
    # Its eval set is the run's: the untrained model's loss there is the direct one, about ln V.
    assert r.initial_eval_loss == pytest.approx(initial, abs=1e-4)
    assert abs(r.initial_eval_loss - math.log(vocab)) < 0.5
    builtin_initial, _, _ = _direct_initial_eval(SPEC)
    assert abs(r.initial_eval_loss - builtin_initial) > 0.1
    # And it trained on the run's tokens: one process on both ranks' batches ends at the same weights.
    data = load_run_data(spec)
    model = build_run_model(spec, data.vocab_size)
    reference_spec = spec.model_copy(update={"batch_size": 2 * spec.batch_size})
    batches = _Concat(*(rank_reader(data.corpus.train, spec, 2, rank) for rank in range(2)))
    trainer = InnerTrainer(model, reference_spec, batches, torch.device("cpu"))
    for _ in range(steps):
        trainer.step()
    assert r.final_params is not None
    assert torch.allclose(r.final_params, ParamLayout.of(model).flatten(model), rtol=0, atol=1e-5)
    assert len(set(r.rank_checksums)) == 1


def test_the_baseline_builds_the_runs_hugging_face_model(tmp_path: Path, hf_offline: None) -> None:
    pytest.importorskip("transformers")
    text = _local_text(tmp_path / "story.txt")
    spec = SPEC.model_copy(
        update={
            "hf_model_config": TINY_LLAMA,
            "data": DataSpec(source="text", paths=[str(text)], eval_fraction=0.2),
        }
    )
    r = run_data_parallel(spec, 2, 2, eval_every=0, timeout_s=240)
    initial, vocab, params = _direct_initial_eval(spec)
    assert vocab == BYTE_VOCAB_SIZE
    assert r.num_parameters == params
    assert r.payload_bytes_per_step == 4 * params
    assert r.initial_eval_loss == pytest.approx(initial, abs=1e-4)
    assert len(set(r.rank_checksums)) == 1


def test_a_crashing_rank_is_named_and_no_rank_survives() -> None:
    with pytest.raises(RankFailedError) as info:
        run_data_parallel(SPEC, 2, STEPS, eval_every=0, crash_at=(1, 3), timeout_s=240)
    err = info.value
    assert err.rank == 1
    assert "rank 1 failed" in str(err) and "injected crash at step 3" in str(err)
    assert "Traceback" in err.detail
    assert len(err.pids) == 2
    assert not any(_pid_alive(pid) for pid in err.pids)
    assert mp.active_children() == []
    assert _spawned_children(os.getpid()) == []


def _tcp_sockets(pid: int) -> int:
    """How many TCP sockets ``pid`` holds open."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            inodes |= {line.split()[9] for line in Path(table).read_text().splitlines()[1:]}
    held = 0
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def _wait_for_training_ranks(caller: subprocess.Popen[bytes], timeout_s: float) -> list[int]:
    # Two TCP sockets each (the rendezvous store and the peer rank) mean the process group is up:
    # from then on the ranks need nothing from the caller and would train on without it.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and caller.poll() is None:
        ranks = _spawned_children(caller.pid)
        if len(ranks) == 2 and all(_tcp_sockets(pid) >= 2 for pid in ranks):
            return ranks
        time.sleep(0.2)
    raise AssertionError("the ranks did not reach training")


def test_ranks_die_with_a_killed_caller(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from antorcha.config import RunSpec
        from antorcha.experiments.baseline import run_data_parallel
        if __name__ == "__main__":
            spec = RunSpec.model_validate_json({SPEC.model_dump_json()!r})
            run_data_parallel(spec, 2, 1_000_000, eval_every=0)
        """
    )
    path = tmp_path / "caller.py"
    path.write_text(script)
    caller = subprocess.Popen([sys.executable, str(path)])
    ranks: list[int] = []
    try:
        ranks = _wait_for_training_ranks(caller, 120)
        caller.send_signal(signal.SIGKILL)
        caller.wait()
        deadline = time.monotonic() + 30
        while any(_pid_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_pid_alive(pid) for pid in ranks)
    finally:
        caller.kill()
        caller.wait()
        for pid in ranks:  # only if the test failed: do not leave them training
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _can_unshare_network() -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_network(), reason="needs root and unshare -n")
def test_private_network_measures_wire_bytes_close_to_the_ring_estimate() -> None:
    r = run_data_parallel(SPEC, 2, 4, eval_every=0, isolate_network=True, timeout_s=240)
    assert r.wire_bytes is not None and r.protocol_overhead is not None
    assert r.wire_bytes > 2 * r.bytes_sent_per_worker
    # Headers and framing add a little; a different all-reduce algorithm would add much more.
    assert 1.0 < r.protocol_overhead < 1.2
    assert r.method.endswith("own network namespace")


def test_ring_estimate() -> None:
    assert ring_bytes_sent(1000, 1) == 0
    assert ring_bytes_sent(1000, 2) == 1000
    assert ring_bytes_sent(900, 3) == 1200
    assert ring_bytes_sent(1000, 4) == 1500
