"""The one place a run's model is built: run spec + the tokenizer's vocabulary in, an fp32 CPU model out.

Owns choosing between the built-in Llama-style presets and a Hugging Face config, making the
vocabulary follow the tokenizer, and switching activation checkpointing (a per-machine choice that
does not change the numbers) on whichever model it is. Every process of a run calls ``build_run_model``
so their parameter layouts agree.
"""

from __future__ import annotations

from torch import nn

from antorcha.config import RunSpec
from antorcha.model.llama import LlamaLM
from antorcha.model.sizes import build_model


def uses_hf_model(spec: RunSpec) -> bool:
    return bool(spec.hf_model or spec.hf_model_config)


def build_run_model(spec: RunSpec, vocab_size: int, *, activation_checkpointing: bool = False) -> nn.Module:
    """The run's freshly initialised model (deterministic from ``spec.seed``) on the CPU in fp32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    model: nn.Module
    if uses_hf_model(spec):
        from antorcha.model.hf import build_hf_model  # imports transformers: only when asked for

        model = build_hf_model(spec, vocab_size)
    else:
        # The built-in model's vocabulary is exactly the tokenizer's: no unused embedding rows.
        model = build_model(spec.model_size, vocab_size, spec.seq_len, spec.seed)
    set_activation_checkpointing(model, activation_checkpointing)
    return model


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each block's activations in the backward pass (less memory, same gradients)."""
    if isinstance(model, LlamaLM):
        model.activation_checkpointing = enabled
        return
    setter = getattr(model, "set_activation_checkpointing", None)
    if setter is not None:
        setter(enabled)
    elif enabled:
        raise ValueError(f"{type(model).__name__} has no activation checkpointing switch")
