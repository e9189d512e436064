"""The inner loop: H steps of AdamW on the worker's own data, from the round's global parameters.

AdamW's state is kept across rounds (each worker's inner optimizer is its own, as in DiLoCo). On CUDA
the forward pass runs under bf16 autocast while parameters and optimizer state stay fp32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from antorcha.config import RunSpec
from antorcha.model import causal_lm_loss


class Batches(Protocol):
    def next_batch(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class InnerStats:
    steps: int
    tokens: int
    mean_loss: float
    seconds: float


class InnerTrainer:
    def __init__(
        self, model: nn.Module, spec: RunSpec, sampler: Batches | None, device: torch.device
    ) -> None:
        self.model, self.spec, self.sampler, self.device = model, spec, sampler, device
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=spec.inner_lr, weight_decay=spec.inner_weight_decay, betas=(0.9, 0.95)
        )
        self.total_steps = 0
        self.last_step_seconds = 0.0
        self._autocast = device.type == "cuda"

    def _lr(self) -> float:
        warmup, decay, step = self.spec.inner_warmup_steps, self.spec.inner_decay_steps, self.total_steps
        if warmup and step < warmup:
            return self.spec.inner_lr * (step + 1) / warmup
        if decay > warmup:
            progress = min(1.0, (step - warmup) / (decay - warmup))
            return self.spec.inner_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        return self.spec.inner_lr

    def step(self) -> float:
        """One AdamW step on the next batch; returns its loss."""
        if self.sampler is None:
            raise RuntimeError("no data: set the trainer's sampler before stepping")
        started = time.perf_counter()
        self.model.train()
        batch = self.sampler.next_batch().to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            loss = causal_lm_loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        self.optimizer.step()
        self.total_steps += 1
        value = float(loss.detach())  # also waits for the device, so the step time below is real
        self.last_step_seconds = time.perf_counter() - started
        return value

    def run(
        self,
        steps: int,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> InnerStats:
        """Run `steps` inner steps; `on_step(step, tokens_so_far, loss)` is called after each, and
        `should_stop()` is asked before each so a SIGTERM does not wait for the round to end."""
        tokens_per_step = self.spec.batch_size * self.spec.seq_len
        start, losses = time.perf_counter(), []
        for i in range(steps):
            if should_stop is not None and should_stop():
                break
            losses.append(self.step())
            if on_step is not None:
                on_step(i + 1, (i + 1) * tokens_per_step, losses[-1])
        mean = sum(losses) / len(losses) if losses else math.nan
        done = len(losses)
        return InnerStats(done, done * tokens_per_step, mean, time.perf_counter() - start)
