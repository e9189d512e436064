"""Behaviour of the Llama model, its loss, and the named presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from antorcha.model import (
    MODEL_SIZES,
    LlamaLM,
    ModelDims,
    build_model,
    causal_lm_loss,
    count_parameters,
    estimate_parameters,
    model_dims,
)
from antorcha.model.llama import apply_rotary, rotary_tables

VOCAB = 256
SEQ = 32


@pytest.fixture
def nano() -> LlamaLM:
    return build_model("nano", VOCAB, SEQ, seed=0)


def random_batch(batch: int = 4, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_dtype(nano: LlamaLM) -> None:
    logits = nano(random_batch()[:, :-1])
    assert logits.shape == (4, SEQ, VOCAB)
    assert logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in nano.parameters())


def test_shorter_sequences_work_and_too_long_raises(nano: LlamaLM) -> None:
    assert nano(random_batch(seq=5)[:, :-1]).shape == (4, 5, VOCAB)
    with pytest.raises(ValueError, match="max_seq_len"):
        nano(torch.zeros(1, SEQ + 1, dtype=torch.long))


def test_causality(nano: LlamaLM) -> None:
    nano.eval()
    tokens = random_batch(batch=2)[:, :-1]
    changed = tokens.clone()
    t = 10
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = nano(tokens), nano(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, t:], after[:, t:], atol=1e-4)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    dims = ModelDims(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    cos, sin = rotary_tables(dims)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, dims.head_dim, generator=gen)

    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rotary(q.view(1, 1, 1, -1), cos[i : i + 1], sin[i : i + 1])
        kj = apply_rotary(k.view(1, 1, 1, -1), cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(7, 3), score(27, 23), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)


def test_same_seed_identical_different_seed_differs() -> None:
    a = build_model("nano", VOCAB, SEQ, seed=3).state_dict()
    b = build_model("nano", VOCAB, SEQ, seed=3).state_dict()
    c = build_model("nano", VOCAB, SEQ, seed=4).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
    assert not torch.equal(a["blocks.1.mlp.w_down.weight"], c["blocks.1.mlp.w_down.weight"])


def test_build_model_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    build_model("nano", VOCAB, SEQ, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())


def test_init_scales() -> None:
    model = build_model("micro", VOCAB, SEQ, seed=0)
    n_layers = MODEL_SIZES["micro"].n_layers
    residual_std = 0.02 / math.sqrt(2 * n_layers)
    for name, param in model.named_parameters():
        if name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
            assert param.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name


def test_rotary_buffers_are_not_state() -> None:
    model = build_model("nano", VOCAB, SEQ, seed=0)
    buffers = dict(model.named_buffers())
    assert {"rope_cos", "rope_sin"} <= buffers.keys()
    assert not any("rope" in k for k in model.state_dict())
    assert not any("rope" in name for name, _ in model.named_parameters())
    # Built via the meta device, the tables must still hold real values: cos(0) = 1, sin(0) = 0.
    assert torch.equal(buffers["rope_cos"][0], torch.ones_like(buffers["rope_cos"][0]))
    assert torch.equal(buffers["rope_sin"][0], torch.zeros_like(buffers["rope_sin"][0]))


def test_untied_head_has_its_own_weight() -> None:
    dims = ModelDims(VOCAB, 32, 1, 2, 64, SEQ, tie_embeddings=False)
    model = LlamaLM(dims)
    assert "lm_head.weight" in model.state_dict()
    assert count_parameters(model) == estimate_parameters(dims)
    tied = LlamaLM(ModelDims(VOCAB, 32, 1, 2, 64, SEQ))
    assert count_parameters(model) - count_parameters(tied) == VOCAB * 32


@pytest.mark.parametrize("size", ["nano", "micro", "small"])
def test_estimate_matches_count(size: str) -> None:
    model = build_model(size, VOCAB, SEQ, seed=0)
    assert count_parameters(model) == estimate_parameters(model_dims(size, VOCAB, SEQ))


@pytest.mark.parametrize(
    ("size", "vocab", "low", "high"),
    [
        ("nano", 256, 100_000, 300_000),
        ("micro", 256, 700_000, 1_500_000),
        ("small", 256, 7_000_000, 15_000_000),
        ("base", 32000, 70_000_000, 150_000_000),
        ("large", 32000, 800_000_000, 1_200_000_000),
    ],
)
def test_preset_sizes(size: str, vocab: int, low: int, high: int) -> None:
    assert low <= estimate_parameters(model_dims(size, vocab, 2048)) <= high


def test_presets_grow_monotonically() -> None:
    counts = [estimate_parameters(p.dims(32000, 2048)) for p in MODEL_SIZES.values()]
    assert counts == sorted(counts)
    assert len(set(counts)) == len(counts)


def test_unknown_size_names_known_sizes() -> None:
    with pytest.raises(ValueError, match="gigantic") as info:
        build_model("gigantic", VOCAB, SEQ, seed=0)
    assert all(name in str(info.value) for name in MODEL_SIZES)


def test_initial_loss_near_uniform(nano: LlamaLM) -> None:
    loss = causal_lm_loss(nano, random_batch(batch=8)).item()
    assert abs(loss - math.log(VOCAB)) < 0.3


def test_loss_uses_shifted_targets() -> None:
    class PredictNext(nn.Module):
        """Puts almost all probability on token + 1, so only correctly shifted targets score ~0."""

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return 50.0 * F.one_hot((tokens + 1) % VOCAB, VOCAB).float()

    counting = torch.arange(SEQ + 1).repeat(2, 1)
    assert causal_lm_loss(PredictNext(), counting).item() < 1e-6
    assert causal_lm_loss(PredictNext(), counting.flip(1)).item() > 10


def test_adamw_lowers_loss_on_fixed_batch(nano: LlamaLM) -> None:
    batch = random_batch(batch=4)
    optimizer = torch.optim.AdamW(nano.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = causal_lm_loss(nano, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_activation_checkpointing_gives_same_gradients() -> None:
    batch = random_batch(batch=2)
    grads = []
    for checkpointing in (False, True):
        model = build_model("nano", VOCAB, SEQ, seed=0)
        model.activation_checkpointing = checkpointing
        causal_lm_loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_invalid_dims_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelDims(VOCAB, 30, 1, 4, 64, SEQ)
    with pytest.raises(ValueError, match="even head_dim"):
        ModelDims(VOCAB, 12, 1, 4, 64, SEQ)
