"""Model configs small enough for CPU tests, shared by tests in every folder (importable because
tests/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

# A 2-layer Llama for `hf_model_config`: built offline by transformers, no download.
TINY_LLAMA: dict[str, object] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
