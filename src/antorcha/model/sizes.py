"""Named model sizes and seeded model construction.

Owns the presets (shape only, independent of vocabulary and context length), ``build_model``, which
turns a preset name and a seed into identical weights on every call, and parameter counting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from antorcha.model.llama import LlamaLM, ModelDims


@dataclass(frozen=True)
class SizePreset:
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int

    def dims(self, vocab_size: int, max_seq_len: int) -> ModelDims:
        return ModelDims(
            vocab_size=vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            max_seq_len=max_seq_len,
        )


# Approximate sizes in the comments are with tied embeddings: at vocab 256 for the three smallest,
# at vocab 32000 for the two largest.
MODEL_SIZES: dict[str, SizePreset] = {
    "nano": SizePreset(d_model=64, n_layers=2, n_heads=4, d_ff=192),  # ~0.12M
    "micro": SizePreset(d_model=128, n_layers=4, n_heads=4, d_ff=512),  # ~1.1M
    "small": SizePreset(d_model=384, n_layers=6, n_heads=6, d_ff=1024),  # ~10.7M
    "base": SizePreset(d_model=768, n_layers=12, n_heads=12, d_ff=2048),  # ~110M
    "large": SizePreset(d_model=2048, n_layers=18, n_heads=16, d_ff=5632),  # ~0.99B
}


def model_dims(size: str, vocab_size: int, max_seq_len: int) -> ModelDims:
    """The full dims of a named preset; ``ValueError`` names the known sizes on a typo."""
    try:
        preset = MODEL_SIZES[size]
    except KeyError:
        known = ", ".join(MODEL_SIZES)
        raise ValueError(f"unknown model size {size!r}; known sizes: {known}") from None
    return preset.dims(vocab_size, max_seq_len)


def build_model(size: str, vocab_size: int, max_seq_len: int, seed: int) -> LlamaLM:
    """A freshly initialised fp32 CPU model; the same arguments give bitwise identical parameters.

    The global RNG is left untouched, so building a model never shifts a caller's random stream.
    """
    dims = model_dims(size, vocab_size, max_seq_len)
    # Built on meta first: the default per-layer init would cost seconds at the large sizes and then
    # be overwritten anyway.
    model = LlamaLM(dims, device="meta")
    model.to_empty(device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    model.reset_parameters(generator)
    return model


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable-or-not parameters; a tensor shared by two modules counts once."""
    return sum(p.numel() for p in model.parameters())


def estimate_parameters(dims: ModelDims) -> int:
    """What ``count_parameters`` would return for a model of these dims, without building it."""
    embedding = dims.vocab_size * dims.d_model
    attention = 4 * dims.d_model * dims.d_model
    mlp = 3 * dims.d_model * dims.d_ff
    norms = 2 * dims.d_model
    head = 0 if dims.tie_embeddings else dims.vocab_size * dims.d_model
    return embedding + dims.n_layers * (attention + mlp + norms) + dims.d_model + head
