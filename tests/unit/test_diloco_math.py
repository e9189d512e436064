"""DiLoCo's math against independent computations: a one-worker round with outer lr 1 and no momentum
is exactly H plain inner steps; the outer Nesterov step matches a hand computation and torch's SGD."""

from __future__ import annotations

import asyncio
import copy
import itertools

import pytest
import torch

from antorcha.averaging import codecs
from antorcha.averaging.base import AveragingGroup, GroupMember
from antorcha.averaging.reducer import ReduceSession
from antorcha.averaging.spans import span_layout
from antorcha.config import RunSpec
from antorcha.data import ShardSampler
from antorcha.diloco.inner import InnerTrainer
from antorcha.diloco.outer import OuterOptimizer
from antorcha.diloco.params import ParamLayout
from antorcha.diloco.pseudo_gradient import BadPseudoGradientError, all_finite, pseudo_gradient
from antorcha.model import build_model


def _sampler(seed: int) -> ShardSampler:
    tokens = torch.randint(0, 256, (50_000,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return ShardSampler(tokens, 4, 1, 32, 4, seed)


def test_one_worker_round_with_unit_outer_lr_equals_plain_inner_steps() -> None:
    spec = RunSpec(
        seq_len=32, batch_size=4, inner_steps=7, inner_warmup_steps=0, outer_lr=1.0, outer_momentum=0.0
    )
    torch.manual_seed(0)
    diloco_model = build_model("nano", 256, 32, seed=3)
    plain_model = copy.deepcopy(diloco_model)
    layout = ParamLayout.of(diloco_model)
    theta = layout.flatten(diloco_model)

    InnerTrainer(plain_model, spec, _sampler(5), torch.device("cpu")).run(spec.inner_steps)

    InnerTrainer(diloco_model, spec, _sampler(5), torch.device("cpu")).run(spec.inner_steps)
    delta = pseudo_gradient(theta, layout.flatten(diloco_model))
    # The one-member all-reduce path: the reducer's weighted mean of a single contribution.
    group = AveragingGroup("g", (GroupMember("me", (), 123.0, 1.0),), "none", 5.0)

    async def reduce_alone() -> torch.Tensor:
        session = ReduceSession(group, span_layout(delta.numel(), group)[0])
        out = torch.empty_like(delta)
        for i, (lo, hi) in enumerate(session.chunk_bounds):
            session.contribute("me", i, 123.0, codecs.encode("none", delta[lo:hi]), hi - lo)
            out[lo:hi] = codecs.decode("none", (await session.result(i, 1.0)).payload, hi - lo)
        return out

    average = asyncio.run(reduce_alone())
    OuterOptimizer(1.0, 0.0, False, torch.zeros_like(theta)).step(theta, average)

    expected = layout.flatten(plain_model)
    assert not torch.equal(expected, layout.flatten(build_model("nano", 256, 32, seed=3)))  # it did train
    torch.testing.assert_close(theta, expected, atol=1e-6, rtol=0)


def test_outer_nesterov_step_matches_hand_computation() -> None:
    theta = torch.tensor([1.0, 2.0])
    opt = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True, momentum_buffer=torch.zeros(2))
    opt.step(theta, torch.tensor([0.5, -1.0]))
    # m = g = [0.5, -1]; update = g + 0.9 m = [0.95, -1.9]; θ = θ - 0.7 update
    torch.testing.assert_close(theta, torch.tensor([1 - 0.665, 2 + 1.33]))
    opt.step(theta, torch.tensor([0.1, 0.2]))
    # m = 0.9 [0.5, -1] + [0.1, 0.2] = [0.55, -0.7]; update = g + 0.9 m = [0.595, -0.43]
    torch.testing.assert_close(theta, torch.tensor([0.335 - 0.4165, 3.33 + 0.301]))
    torch.testing.assert_close(opt.momentum_buffer, torch.tensor([0.55, -0.7]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_agrees_with_torch_sgd(nesterov: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    ours = torch.randn(100, generator=gen)
    ref = torch.nn.Parameter(ours.clone())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=nesterov)
    opt = OuterOptimizer(0.7, 0.9, nesterov, torch.zeros(100))
    for _ in range(5):
        g = torch.randn(100, generator=gen)
        opt.step(ours, g)
        ref.grad = g.clone()
        sgd.step()
    torch.testing.assert_close(ours, ref.detach(), atol=1e-6, rtol=1e-6)


def test_outer_step_refuses_mismatched_shapes_and_leaves_params_alone() -> None:
    theta = torch.ones(4)
    opt = OuterOptimizer(0.7, 0.9, True, torch.zeros(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        opt.step(theta, torch.ones(5))
    assert torch.equal(theta, torch.ones(4))


def test_pseudo_gradient_rejects_non_finite_values() -> None:
    local = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(BadPseudoGradientError, match="1 non-finite"):
        pseudo_gradient(torch.zeros(3), local)
    torch.testing.assert_close(pseudo_gradient(torch.ones(3), torch.zeros(3)), torch.ones(3))


def test_inner_learning_rate_warms_up_then_decays_by_cosine_to_a_tenth() -> None:
    spec = RunSpec(inner_lr=1e-2, inner_warmup_steps=10, inner_decay_steps=110)
    trainer = InnerTrainer(torch.nn.Linear(2, 2), spec, None, torch.device("cpu"))
    lrs = []
    for step in range(130):
        trainer.total_steps = step
        lrs.append(trainer._lr())
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert lrs[10] == pytest.approx(1e-2), "the decay starts at the peak"
    assert lrs[60] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5)), "halfway: midpoint of the cosine"
    assert lrs[110] == pytest.approx(1e-3) and lrs[129] == pytest.approx(1e-3), "then stays at a tenth"
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])), "never rises after warm-up"
    constant = InnerTrainer(
        torch.nn.Linear(2, 2), RunSpec(inner_lr=1e-2, inner_warmup_steps=0), None, torch.device("cpu")
    )
    constant.total_steps = 10_000
    assert constant._lr() == 1e-2


def test_all_finite_finds_every_nan_and_inf_and_survives_overflowing_sums() -> None:
    values = torch.randn(100_003)
    assert all_finite(values)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 50_000, 100_002):
            broken = values.clone()
            broken[where] = bad
            assert not all_finite(broken)
    pair = values.clone()
    pair[1], pair[2] = float("inf"), float("-inf")  # their sum is NaN, not a cancellation
    assert not all_finite(pair)
    huge = torch.full((8,), 3e38)  # finite values whose fp32 sum overflows: the exact test decides
    assert bool(torch.isinf(huge.sum())) and all_finite(huge)
