"""Turning a token stream into batches: per-worker shards, random training windows, fixed eval windows.

Owns how the training split is divided among workers (disjoint shards of windows, shuffled by
default), how a worker reads or samples its batches from its own shard, and the deterministic
evaluation batches and loss.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from antorcha.model import causal_lm_loss


def shard_bounds(num_tokens: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """[start, end) of shard ``shard_index``; shards tile [0, num_tokens) with sizes differing by <= 1."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is out of range for {num_shards} shards")
    base, extra = divmod(num_tokens, num_shards)
    # The first `extra` shards take one extra token each.
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (1 if shard_index < extra else 0)


class ShardSampler:
    """Random [batch_size, seq_len + 1] windows from one shard of a token stream.

    The stream of batches is a pure function of (tokens, num_shards, shard_index, seed), so a worker
    that restarts with the same arguments replays the same batches.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        num_shards: int,
        shard_index: int,
        seq_len: int,
        batch_size: int,
        seed: int,
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        self.tokens = tokens
        self.num_shards = num_shards
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._offsets = torch.arange(seq_len + 1)
        self._generator = torch.Generator(device="cpu")
        self.set_shard(shard_index, seed)

    def set_shard(self, shard_index: int, seed: int) -> None:
        """Move to another shard and restart the random stream from ``seed``."""
        start, end = shard_bounds(self.tokens.numel(), self.num_shards, shard_index)
        if end - start < self.seq_len + 1:
            raise ValueError(
                f"shard {shard_index}/{self.num_shards} holds {end - start} tokens, "
                f"fewer than one window of seq_len + 1 = {self.seq_len + 1}"
            )
        self.shard_index = shard_index
        self.start, self.end = start, end
        self._generator.manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        # The last valid start leaves exactly seq_len + 1 tokens before the shard end.
        num_starts = self.end - self.start - self.seq_len
        starts = self.start + torch.randint(num_starts, (self.batch_size,), generator=self._generator)
        return self.tokens[starts[:, None] + self._offsets].long()


@functools.lru_cache(maxsize=4)
def window_order(num_windows: int, seed: int) -> torch.Tensor:
    """The shuffled order of a split's windows: a permutation fixed by (num_windows, seed)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(num_windows, generator=generator)


class ShardReader:
    """[batch_size, seq_len + 1] windows of one shard, each once per pass through it, in a fixed order.

    The split is cut into windows of seq_len + 1 tokens that overlap by one (window i starts at token
    i × seq_len, so its last target is the next window's first input). With ``shuffled`` (the default)
    the windows are put in a seeded random order and shard s is the s-th slice of that order: every
    shard is a uniform sample of the whole split, as the i.i.d. per-worker data DiLoCo assumes. With
    ``shuffled=False`` shard s is the s-th run of consecutive windows (a region of the text; one shard
    of a round's worth of steps is then often one source file, and long local training drifts toward
    it). Either way the shards partition the windows, and reading a shard front to back is what lets
    the coordinator's data ledger promise that a shard trained once was seen once. At the shard's end
    the reader wraps to its start.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        num_shards: int,
        seq_len: int,
        batch_size: int,
        *,
        shuffled: bool = True,
        seed: int = 0,
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.tokens, self.num_shards, self.seq_len, self.batch_size = tokens, num_shards, seq_len, batch_size
        self.shuffled, self.seed = shuffled, seed
        self.num_windows = max(0, (tokens.numel() - 1) // seq_len)
        self._offsets = torch.arange(seq_len + 1)
        self.start(0)

    def start(self, shard_index: int) -> None:
        lo, hi = shard_bounds(self.num_windows, self.num_shards, shard_index)
        if hi - lo < 1:
            raise ValueError(
                f"shard {shard_index}/{self.num_shards} of {self.tokens.numel()} tokens holds fewer than "
                f"one window of seq_len + 1 = {self.seq_len + 1} tokens"
            )
        order = window_order(self.num_windows, self.seed)[lo:hi] if self.shuffled else torch.arange(lo, hi)
        self.shard_index, self.windows, self.position = shard_index, order, 0

    @property
    def shard_tokens(self) -> int:
        """Tokens in one pass through the shard (its windows less the one token each shares)."""
        return self.windows.numel() * self.seq_len

    def next_batch(self) -> torch.Tensor:
        picked = torch.arange(self.position, self.position + self.batch_size) % self.windows.numel()
        self.position = (self.position + self.batch_size) % self.windows.numel()
        starts = self.windows[picked] * self.seq_len
        return self.tokens[starts[:, None] + self._offsets].long()


def shards_for_rounds(num_tokens: int, tokens_per_round: int) -> int:
    """How many shards make each one a single round's worth of one worker's tokens."""
    return max(1, num_tokens // max(1, tokens_per_round))


def eval_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """Up to ``max_batches`` full batches of non-overlapping windows spread evenly over ``tokens``.

    Spreading (rather than taking the head) makes the estimate cover every eval file, not just the
    first few.
    """
    if seq_len < 1 or batch_size < 1 or max_batches < 1:
        raise ValueError("seq_len, batch_size and max_batches must all be positive")
    window = seq_len + 1
    available = tokens.numel() // window
    num_batches = min(max_batches, available // batch_size)
    if num_batches == 0:
        raise ValueError(
            f"{tokens.numel()} eval tokens hold {available} windows of {window}, "
            f"fewer than one batch of {batch_size}"
        )
    count = num_batches * batch_size
    # Distinct, increasing slot indices because available >= count; slot * window never overlaps.
    slots = torch.arange(count) * available // count
    windows = tokens[(slots * window)[:, None] + torch.arange(window)].long()
    return list(windows.split(batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean ``causal_lm_loss`` over ``batches``, in eval mode; the model's mode is restored after."""
    if not batches:
        raise ValueError("evaluate needs at least one batch")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total = sum(causal_lm_loss(model, batch.to(device)).item() for batch in batches)
    finally:
        model.train(was_training)
    return total / len(batches)
