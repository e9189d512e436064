"""The language model: a small Llama-style causal LM, its loss, named sizes and seeded construction."""

from antorcha.model.llama import LlamaLM, ModelDims, causal_lm_loss
from antorcha.model.sizes import MODEL_SIZES, build_model, count_parameters, estimate_parameters, model_dims

__all__ = [
    "MODEL_SIZES",
    "LlamaLM",
    "ModelDims",
    "build_model",
    "causal_lm_loss",
    "count_parameters",
    "estimate_parameters",
    "model_dims",
]
