"""The GPU path of the inner loop, exercised on the CPU: bf16 autocast, gradient accumulation over
micro-batches, activation checkpointing, and counting the tokens really trained.

Accumulation and checkpointing must not change the numbers (beyond floating-point summation order),
since workers with different memory may pick different settings in one run. A last test runs on CUDA
where there is one.
"""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_models import TINY_LLAMA
from torch import nn

from antorcha.config import RunSpec, WorkerSettings
from antorcha.data import ShardReader
from antorcha.diloco.inner import InnerTrainer, autocast_dtype
from antorcha.model import causal_lm_loss
from antorcha.model.factory import build_run_model, set_activation_checkpointing

SPEC = RunSpec(seq_len=32, batch_size=8, inner_warmup_steps=0, grad_clip=1e6, seed=3)
CPU = torch.device("cpu")


class FixedBatches:
    """Always the same batch (so two trainers see identical data)."""

    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def next_batch(self) -> torch.Tensor:
        return self.batch


def _batch(rows: int = 8, seq_len: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float, atol: float) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("micro", [1, 2, 3, 4])
def test_accumulated_micro_batches_give_the_full_batch_update(micro: int) -> None:
    batch = _batch()
    full_model, accum_model = build_run_model(SPEC, 256), build_run_model(SPEC, 256)
    full = InnerTrainer(full_model, SPEC, FixedBatches(batch), CPU)
    accum = InnerTrainer(accum_model, SPEC, FixedBatches(batch), CPU, micro_batch_size=micro)
    for _ in range(2):  # the second step also checks AdamW state built from accumulated gradients
        loss_full, loss_accum = full.step(), accum.step()
        assert loss_accum == pytest.approx(loss_full, rel=1e-5)
        _assert_close(_grads(accum_model), _grads(full_model), rtol=1e-4, atol=1e-7)
    # AdamW divides by sqrt(v), which magnifies rounding differences of near-zero gradients; 2e-5 is
    # under 1% of one step's size (lr 3e-3), far below any real difference in the update.
    _assert_close(_params(accum_model), _params(full_model), rtol=1e-5, atol=2e-5)
    assert accum.last_step_tokens == full.last_step_tokens == 8 * 32


def test_one_micro_batch_as_large_as_the_batch_is_bitwise_the_plain_step() -> None:
    batch = _batch()
    a, b = build_run_model(SPEC, 256), build_run_model(SPEC, 256)
    InnerTrainer(a, SPEC, FixedBatches(batch), CPU).step()
    InnerTrainer(b, SPEC, FixedBatches(batch), CPU, micro_batch_size=8).step()
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b), strict=True))


def test_negative_micro_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="micro_batch_size"):
        InnerTrainer(build_run_model(SPEC, 256), SPEC, None, CPU, micro_batch_size=-1)


def _hf_spec() -> RunSpec:
    pytest.importorskip("transformers")
    return SPEC.model_copy(update={"hf_model_config": TINY_LLAMA})


@pytest.mark.parametrize("kind", ["builtin", "hf"])
def test_activation_checkpointing_gives_the_same_gradients(kind: str) -> None:
    spec = SPEC if kind == "builtin" else _hf_spec()
    batch = _batch()
    plain = build_run_model(spec, 256)
    checkpointed = build_run_model(spec, 256, activation_checkpointing=True)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        causal_lm_loss(model, batch).backward()
        grads.append(_grads(model))
    _assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)
    # The switch really switched: checkpointing keeps fewer tensors alive for the backward pass.
    saved = []
    for model in (plain, checkpointed):
        count = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(model, batch)
        saved.append(count)
    assert saved[1] < saved[0]
    set_activation_checkpointing(checkpointed, False)


def test_bf16_autocast_runs_on_cpu_and_keeps_fp32_master_weights() -> None:
    batch = _batch()
    fp32_model, bf16_model = build_run_model(SPEC, 256), build_run_model(SPEC, 256)
    fp32 = InnerTrainer(fp32_model, SPEC, FixedBatches(batch), CPU, precision="fp32")
    bf16 = InnerTrainer(bf16_model, SPEC, FixedBatches(batch), CPU, precision="bf16")
    assert bf16.autocast_dtype is torch.bfloat16 and fp32.autocast_dtype is None
    before = _params(bf16_model)
    loss_fp32, loss_bf16 = fp32.step(), bf16.step()
    assert math.isfinite(loss_bf16) and loss_bf16 == pytest.approx(loss_fp32, abs=0.05)
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16_model.parameters())
    assert not all(torch.equal(x, y) for x, y in zip(before, _params(bf16_model), strict=True))
    # With micro-batches too: accumulation in bf16 autocast stays finite.
    accum = InnerTrainer(
        build_run_model(SPEC, 256), SPEC, FixedBatches(batch), CPU, precision="bf16", micro_batch_size=3
    )
    assert math.isfinite(accum.step())


def test_bf16_autocast_on_an_hf_model_on_cpu() -> None:
    spec = _hf_spec()
    trainer = InnerTrainer(build_run_model(spec, 256), spec, FixedBatches(_batch()), CPU, precision="bf16")
    losses = [trainer.step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_precision_choice() -> None:
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("auto", CPU) is None  # autocast on a CPU is slower than fp32: only on request
    settings = WorkerSettings(precision="bf16", micro_batch_size=4, activation_checkpointing=True)
    assert settings.precision == "bf16" and settings.micro_batch_size == 4


def test_tokens_are_counted_from_the_batches_trained() -> None:
    spec = SPEC.model_copy(update={"batch_size": 8})
    # A reader whose batches are smaller than the spec's: the count follows the data, not the spec.
    tokens = torch.arange(10_000) % 256
    reader = ShardReader(tokens, 1, spec.seq_len, 3)
    trainer = InnerTrainer(build_run_model(spec, 256), spec, reader, CPU, micro_batch_size=2)
    seen: list[int] = []
    stats = trainer.run(4, on_step=lambda step, so_far, loss: seen.append(so_far))
    assert stats.tokens == 4 * 3 * 32 and seen == [96, 192, 288, 384]
    assert trainer.last_step_tokens == 96


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_with_auto_precision_accumulation_and_checkpointing() -> None:
    device = torch.device("cuda")
    model = build_run_model(SPEC, 256, activation_checkpointing=True).to(device)
    trainer = InnerTrainer(model, SPEC, FixedBatches(_batch()), device, micro_batch_size=4)
    supported = torch.cuda.is_bf16_supported()
    assert trainer.autocast_dtype is (torch.bfloat16 if supported else None)
    losses = [trainer.step() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
    # The same update as the CPU fp32 reference up to bf16 rounding.
    reference = build_run_model(SPEC, 256)
    ref = InnerTrainer(reference, SPEC, FixedBatches(_batch()), CPU)
    ref_losses = [ref.step() for _ in range(5)]
    assert losses[0] == pytest.approx(ref_losses[0], abs=0.05)
