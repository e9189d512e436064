"""The pseudo-gradient Δ = θ_round_start − θ_after_inner_steps, and the checks it must pass."""

from __future__ import annotations

import torch


class BadPseudoGradientError(ValueError):
    """A pseudo-gradient is not fit to average (non-finite values or the wrong size)."""


def pseudo_gradient(global_params: torch.Tensor, local_params: torch.Tensor) -> torch.Tensor:
    if global_params.shape != local_params.shape:
        raise BadPseudoGradientError(
            f"shape mismatch: global {tuple(global_params.shape)}, local {tuple(local_params.shape)}"
        )
    delta = torch.sub(global_params, local_params)
    check_finite(delta, "pseudo-gradient")
    return delta


def check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise BadPseudoGradientError(f"{what} has {bad} non-finite values (NaN/Inf)")
