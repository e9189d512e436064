"""Behaviour of the offline corpora, the train/eval split, sharding, sampling and evaluation."""

from __future__ import annotations

import itertools
import sysconfig
from pathlib import Path

import pytest
import torch

from antorcha.data import (
    BYTE_VOCAB_SIZE,
    Corpus,
    ShardSampler,
    eval_batches,
    evaluate,
    is_eval_file,
    load_stdlib_corpus,
    load_text_files,
    shard_bounds,
)
from antorcha.data.corpus import FILE_SEPARATOR, SKIPPED_STDLIB_DIRS, stdlib_source_files
from antorcha.model import build_model, causal_lm_loss

STDLIB_BYTES = 1_000_000
STDLIB_EVAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def stdlib_corpus() -> Corpus:
    return load_stdlib_corpus(max_bytes=STDLIB_BYTES, eval_fraction=STDLIB_EVAL_FRACTION)


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, BYTE_VOCAB_SIZE, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


# --- shard_bounds -------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "num_shards"), [(100, 1), (100, 3), (101, 7), (5, 5), (3, 5), (0, 2)])
def test_shards_are_contiguous_disjoint_covering_and_balanced(num_tokens: int, num_shards: int) -> None:
    bounds = [shard_bounds(num_tokens, num_shards, i) for i in range(num_shards)]
    assert bounds[0][0] == 0
    assert bounds[-1][1] == num_tokens
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("num_shards", "shard_index"), [(3, 3), (3, -1), (0, 0)])
def test_bad_shard_arguments_raise(num_shards: int, shard_index: int) -> None:
    with pytest.raises(ValueError):
        shard_bounds(100, num_shards, shard_index)


# --- ShardSampler -------------------------------------------------------------------------------


def test_sampler_windows_are_contiguous_and_inside_shard() -> None:
    # Token value == position, so every window reveals exactly where it came from.
    tokens = torch.arange(1000)
    seq_len = 16
    for shard in range(3):
        start, end = shard_bounds(1000, 3, shard)
        sampler = ShardSampler(tokens, 3, shard, seq_len=seq_len, batch_size=8, seed=shard)
        for _ in range(50):
            batch = sampler.next_batch()
            assert batch.shape == (8, seq_len + 1)
            assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)
            assert batch.min() >= start
            assert batch.max() < end


def test_sampler_reaches_both_shard_edges() -> None:
    # A shard barely longer than a window: off-by-one errors would miss one edge or cross it.
    tokens = torch.arange(40)
    sampler = ShardSampler(tokens, 2, 1, seq_len=17, batch_size=64, seed=0)
    batch = sampler.next_batch()
    assert batch[:, 0].min() == 20
    assert batch[:, -1].max() == 39


def test_sampler_returns_long_from_uint8() -> None:
    sampler = ShardSampler(random_tokens(500), 2, 0, seq_len=8, batch_size=2, seed=0)
    assert sampler.next_batch().dtype == torch.long


def test_sampler_is_deterministic_given_seed() -> None:
    tokens = random_tokens(10_000)
    a = ShardSampler(tokens, 4, 2, seq_len=32, batch_size=4, seed=7)
    b = ShardSampler(tokens, 4, 2, seq_len=32, batch_size=4, seed=7)
    c = ShardSampler(tokens, 4, 2, seq_len=32, batch_size=4, seed=8)
    batches_a = [a.next_batch() for _ in range(5)]
    batches_b = [b.next_batch() for _ in range(5)]
    batches_c = [c.next_batch() for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c, strict=True))


def test_different_shards_give_different_data() -> None:
    tokens = random_tokens(10_000)
    a = ShardSampler(tokens, 2, 0, seq_len=32, batch_size=4, seed=0).next_batch()
    b = ShardSampler(tokens, 2, 1, seq_len=32, batch_size=4, seed=0).next_batch()
    assert not torch.equal(a, b)


def test_set_shard_matches_a_fresh_sampler() -> None:
    tokens = torch.arange(1000)
    moved = ShardSampler(tokens, 4, 0, seq_len=8, batch_size=4, seed=1)
    moved.next_batch()
    moved.set_shard(3, seed=5)
    fresh = ShardSampler(tokens, 4, 3, seq_len=8, batch_size=4, seed=5)
    for _ in range(3):
        batch = moved.next_batch()
        assert torch.equal(batch, fresh.next_batch())
        assert batch.min() >= shard_bounds(1000, 4, 3)[0]


def test_sampler_rejects_shard_shorter_than_a_window() -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        ShardSampler(random_tokens(64), 4, 0, seq_len=16, batch_size=2, seed=0)
    sampler = ShardSampler(random_tokens(64), 1, 0, seq_len=16, batch_size=2, seed=0)
    with pytest.raises(ValueError):
        sampler.set_shard(1, seed=0)


# --- eval_batches / evaluate --------------------------------------------------------------------


def test_eval_batches_are_deterministic_spread_and_non_overlapping() -> None:
    tokens = torch.arange(10_000)
    seq_len, batch_size = 15, 4
    first = eval_batches(tokens, seq_len, batch_size, max_batches=5)
    second = eval_batches(tokens, seq_len, batch_size, max_batches=5)
    assert len(first) == 5
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    windows = torch.cat(first)
    assert windows.shape == (20, seq_len + 1)
    assert torch.all(windows[:, 1:] - windows[:, :-1] == 1)
    starts = windows[:, 0]
    # Sorted starts at least one window apart means no token is used twice.
    assert torch.all(starts[1:] - starts[:-1] >= seq_len + 1)
    assert starts[0] == 0
    assert windows[-1, -1] > 9_000  # reaches the end of the split, not just its head


def test_eval_batches_limited_by_available_tokens() -> None:
    batches = eval_batches(random_tokens(100), seq_len=9, batch_size=3, max_batches=100)
    assert len(batches) == 3  # 10 windows of 10 -> 3 full batches of 3
    assert all(b.dtype == torch.long and b.shape == (3, 10) for b in batches)
    with pytest.raises(ValueError):
        eval_batches(random_tokens(20), seq_len=9, batch_size=3, max_batches=1)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_mode_and_averages_batch_losses(training: bool) -> None:
    model = build_model("nano", BYTE_VOCAB_SIZE, 32, seed=0)
    model.train(training)
    batches = eval_batches(random_tokens(2_000), seq_len=32, batch_size=2, max_batches=3)
    loss = evaluate(model, batches)
    assert model.training is training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        expected = sum(causal_lm_loss(model, b).item() for b in batches) / len(batches)
    assert loss == pytest.approx(expected, rel=1e-6)


# --- corpora ------------------------------------------------------------------------------------


def test_is_eval_file_is_stable_and_near_fraction() -> None:
    names = [f"pkg/module_{i}.py" for i in range(5_000)]
    picked = [n for n in names if is_eval_file(n, 0.1)]
    assert 0.08 < len(picked) / len(names) < 0.12
    assert picked == [n for n in names if is_eval_file(n, 0.1)]
    # A larger fraction only adds files, so growing eval never moves an eval file into train.
    assert set(picked) <= {n for n in names if is_eval_file(n, 0.3)}


def test_stdlib_files_skip_excluded_dirs() -> None:
    files = stdlib_source_files(Path(sysconfig.get_paths()["stdlib"]))
    rel_paths = [rel for rel, _ in files]
    assert rel_paths == sorted(rel_paths)
    assert len(rel_paths) > 100
    assert all(rel.endswith(".py") for rel in rel_paths)
    assert not any(set(rel.split("/")[:-1]) & SKIPPED_STDLIB_DIRS for rel in rel_paths)


def test_stdlib_corpus_is_split_by_file(stdlib_corpus: Corpus) -> None:
    # Rebuild both splits from the per-file assignment: each split must be exactly its own files.
    files = stdlib_source_files(Path(sysconfig.get_paths()["stdlib"]))
    expected: dict[bool, list[bytes]] = {False: [], True: []}
    for rel, path in files:
        expected[is_eval_file(rel, STDLIB_EVAL_FRACTION)].append(path.read_bytes())
    train = bytes(stdlib_corpus.train.numpy())
    eval_ = bytes(stdlib_corpus.eval.numpy())
    assert FILE_SEPARATOR.join(expected[False]).startswith(train)
    assert FILE_SEPARATOR.join(expected[True]).startswith(eval_)
    # Both splits hold several whole files, so the check above is not vacuous.
    assert train.count(FILE_SEPARATOR) > 1 and eval_.count(FILE_SEPARATOR) > 1
    assert eval_[:2000] not in train


def test_stdlib_corpus_shape_budget_and_fingerprint(stdlib_corpus: Corpus) -> None:
    assert stdlib_corpus.train.dtype == stdlib_corpus.eval.dtype == torch.uint8
    assert stdlib_corpus.train.dim() == stdlib_corpus.eval.dim() == 1
    assert stdlib_corpus.train.numel() + stdlib_corpus.eval.numel() == STDLIB_BYTES
    assert len(stdlib_corpus.fingerprint) == 64
    again = load_stdlib_corpus(max_bytes=STDLIB_BYTES, eval_fraction=STDLIB_EVAL_FRACTION)
    assert again.fingerprint == stdlib_corpus.fingerprint
    assert torch.equal(again.train, stdlib_corpus.train)
    other = load_stdlib_corpus(max_bytes=STDLIB_BYTES, eval_fraction=0.1)
    assert other.fingerprint != stdlib_corpus.fingerprint


def write_files(directory: Path, contents: dict[str, bytes]) -> list[Path]:
    paths = []
    for name, data in contents.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_text_files_split_by_file_name(tmp_path: Path) -> None:
    contents = {f"doc{i}.txt": f"document {i}\n".encode() * 20 for i in range(12)}
    paths = write_files(tmp_path, contents)
    corpus = load_text_files(paths, eval_fraction=0.4)
    eval_names = [n for n in contents if is_eval_file(n, 0.4)]
    assert 0 < len(eval_names) < len(contents), "pick a fraction that gives a mixed split for these names"
    train_names = [n for n in contents if n not in eval_names]
    assert bytes(corpus.eval.numpy()) == FILE_SEPARATOR.join(contents[n] for n in eval_names)
    assert bytes(corpus.train.numpy()) == FILE_SEPARATOR.join(contents[n] for n in train_names)


def test_text_files_never_leave_eval_empty(tmp_path: Path) -> None:
    contents = {"a.txt": b"alpha " * 50, "b.txt": b"beta " * 50, "c.txt": "gamma é ".encode() * 50}
    corpus = load_text_files(write_files(tmp_path, contents), eval_fraction=1e-12)
    eval_ = bytes(corpus.eval.numpy())
    assert eval_ in contents.values()  # exactly one whole file
    assert eval_ not in bytes(corpus.train.numpy())


def test_single_text_file_splits_its_tail(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    corpus = load_text_files(write_files(tmp_path, {"only.bin": data}), eval_fraction=0.25)
    assert bytes(corpus.train.numpy()) == data[:768]
    assert bytes(corpus.eval.numpy()) == data[768:]


def test_text_files_need_a_path() -> None:
    with pytest.raises(ValueError):
        load_text_files([], eval_fraction=0.1)
