"""The shard reader: shards partition the training windows, each read once per pass, and (by default)
every shard is a uniform sample of the whole split rather than one region of the text."""

from __future__ import annotations

import pytest
import torch

from antorcha.config import RunSpec
from antorcha.data import ShardReader
from antorcha.data.source import shard_reader

SEQ_LEN, BATCH = 8, 4


def _window_starts(reader: ShardReader, batches: int) -> list[int]:
    """The first token of every window read: with tokens = arange, the window's start offset."""
    starts: list[int] = []
    for _ in range(batches):
        batch = reader.next_batch()
        assert batch.shape == (BATCH, SEQ_LEN + 1)
        # Windows are consecutive tokens: each row is start, start+1, ..., start+seq_len.
        assert torch.equal(batch - batch[:, :1], torch.arange(SEQ_LEN + 1).expand(BATCH, -1))
        starts += batch[:, 0].tolist()
    return starts


@pytest.mark.parametrize("shuffled", [True, False])
def test_shards_partition_the_windows_and_a_pass_reads_each_once(shuffled: bool) -> None:
    tokens = torch.arange(8 * 40 * 6 + 1)  # 240 windows, 6 shards of 40 = 10 batches each
    seen: list[int] = []
    for shard in range(6):
        reader = ShardReader(tokens, 6, SEQ_LEN, BATCH, shuffled=shuffled, seed=3)
        reader.start(shard)
        one_pass = _window_starts(reader, 10)
        assert len(set(one_pass)) == 40, "a pass through a shard reads each of its windows once"
        assert _window_starts(reader, 10) == one_pass, "then it wraps to the shard's start"
        seen += one_pass
    assert sorted(seen) == list(range(0, 240 * SEQ_LEN, SEQ_LEN)), "every window in exactly one shard"


def test_shuffled_shards_sample_the_whole_split_and_contiguous_ones_a_region() -> None:
    tokens = torch.arange(8 * 1000 + 1)
    quarter = tokens.numel() // 4
    for shuffled, spread in ((True, True), (False, False)):
        reader = ShardReader(tokens, 10, SEQ_LEN, BATCH, shuffled=shuffled, seed=0)
        reader.start(4)
        starts = _window_starts(reader, 25)
        covers_every_quarter = {s // quarter for s in starts} == {0, 1, 2, 3}
        assert covers_every_quarter is spread


def test_the_order_is_fixed_by_the_seed() -> None:
    tokens = torch.arange(8 * 200 + 1)

    def first_batches(seed: int) -> list[int]:
        reader = ShardReader(tokens, 4, SEQ_LEN, BATCH, seed=seed)
        reader.start(2)
        return _window_starts(reader, 5)

    assert first_batches(1) == first_batches(1)
    assert first_batches(1) != first_batches(2)


def test_a_run_spec_chooses_the_order_and_the_seed() -> None:
    tokens = torch.arange(8 * 200 + 1)
    base = {"seq_len": SEQ_LEN, "batch_size": BATCH, "seed": 5}
    shuffled = shard_reader(RunSpec.model_validate(base), tokens, 4)
    contiguous_spec = RunSpec.model_validate(base | {"data": {"window_order": "contiguous"}})
    contiguous = shard_reader(contiguous_spec, tokens, 4)
    assert (shuffled.shuffled, shuffled.seed) == (True, 5)
    assert contiguous.shuffled is False
    contiguous.start(1)
    assert _window_starts(contiguous, 2) == list(range(50 * SEQ_LEN, 58 * SEQ_LEN, SEQ_LEN))
    with pytest.raises(ValueError, match="window_order"):
        RunSpec.model_validate(base | {"data": {"window_order": "random"}})


def test_a_shard_without_a_whole_window_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        ShardReader(torch.arange(8), 1, SEQ_LEN, BATCH)  # 8 tokens: not one window of 9
    short = ShardReader(torch.arange(30), 4, SEQ_LEN, BATCH)  # 3 windows for 4 shards
    with pytest.raises(ValueError, match=r"shard 3/4 .* fewer than one window"):
        short.start(3)
    reader = ShardReader(torch.arange(40), 4, SEQ_LEN, BATCH)
    with pytest.raises(ValueError, match="out of range"):
        reader.start(4)
