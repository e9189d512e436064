"""Hugging Face causal LMs as antorcha models (optional ``antorcha[hf]`` extra).

Owns turning the run spec's ``hf_model`` / ``hf_model_config`` into a ``transformers`` config (from a
local directory, a Hub id, or values alone with ``model_type``), checking it fits the tokenizer and the
sequence length, building the model from that config with seeded weights (no weights are downloaded:
every run starts from its own initialisation, as with the built-in model), and the thin wrapper that
gives it the built-in model's interface: ``forward(tokens) -> logits``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from antorcha.config import RunSpec
from antorcha.data.tokenizers import HF_EXTRA_HINT


class ModelConfigError(ValueError):
    """The run's model configuration cannot be built or does not fit its tokenizer/sequence length."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ModelConfigError(f"Hugging Face models need transformers; {HF_EXTRA_HINT}") from e
    return transformers


def hf_config(spec: RunSpec, vocab_size: int) -> Any:
    """The ``PretrainedConfig`` of the run; its vocabulary defaults to the tokenizer's."""
    transformers = _transformers()
    values = dict(spec.hf_model_config)
    if spec.hf_model:
        try:
            config = transformers.AutoConfig.from_pretrained(spec.hf_model)
        except (OSError, ValueError) as e:
            raise ModelConfigError(f"cannot load the model config {spec.hf_model!r}: {e}") from e
        values.pop("model_type", None)  # the directory's config decides the architecture
        config.update(values)
    else:
        model_type = values.pop("model_type", None)
        if not isinstance(model_type, str) or not model_type:
            raise ModelConfigError("hf_model_config needs a model_type (e.g. 'llama') when hf_model is empty")
        values.setdefault("vocab_size", vocab_size)
        values.setdefault("max_position_embeddings", spec.seq_len)
        try:
            config = transformers.AutoConfig.for_model(model_type, **values)
        except (ValueError, TypeError) as e:
            raise ModelConfigError(f"cannot build a {model_type!r} config from hf_model_config: {e}") from e
    model_vocab = getattr(config, "vocab_size", None)
    if not isinstance(model_vocab, int) or model_vocab < vocab_size:
        raise ModelConfigError(
            f"the tokenizer has {vocab_size} ids but the model's vocab_size is {model_vocab}; "
            "raise vocab_size in hf_model_config (or leave it out to follow the tokenizer)"
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and spec.seq_len > max_positions:
        raise ModelConfigError(
            f"seq_len {spec.seq_len} exceeds the model's max_position_embeddings {max_positions}"
        )
    # Generation caches are useless in training and cost memory.
    config.use_cache = False
    return config


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM behind the built-in model's interface: tokens [B, T] -> logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits

    def set_activation_checkpointing(self, enabled: bool) -> None:
        hf = self.hf
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; 4.x has the old.
        renamed = hasattr(hf, "activation_checkpointing_enable")
        if enabled:
            if not getattr(hf, "supports_gradient_checkpointing", False):
                raise ModelConfigError(f"{type(hf).__name__} does not support activation checkpointing")
            # Non-reentrant: works with inputs that need no grad and gives the same gradients.
            kwargs = {"use_reentrant": False}
            if renamed:
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif renamed:
            if hf.is_activation_checkpointing:
                hf.activation_checkpointing_disable()
        elif hf.is_gradient_checkpointing:
            hf.gradient_checkpointing_disable()


def build_hf_model(spec: RunSpec, vocab_size: int) -> HFCausalLM:
    """A freshly initialised fp32 CPU model; the same spec gives the same weights on a given torch.

    The global RNG is seeded inside ``fork_rng`` so building never shifts a caller's random stream.
    """
    transformers = _transformers()
    config = hf_config(spec, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ModelConfigError(f"{type(config).__name__} is not a causal language model: {e}") from e
    return HFCausalLM(model.to(torch.float32))
