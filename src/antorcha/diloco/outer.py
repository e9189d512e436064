"""The outer optimizer: SGD with (Nesterov) momentum on the averaged pseudo-gradient.

Every replica must end a round with bitwise-identical parameters, whatever its hardware. Fused
multiply-adds round differently from a multiply followed by an add, and which one a kernel uses
depends on the CPU or GPU, so each step is written as separate elementwise multiplies and adds on
fp32 CPU tensors: every operation is a single IEEE-754 rounding, the same everywhere.
"""

from __future__ import annotations

import torch


class OuterOptimizer:
    def __init__(self, lr: float, momentum: float, nesterov: bool, momentum_buffer: torch.Tensor) -> None:
        if momentum_buffer.dtype != torch.float32 or momentum_buffer.device.type != "cpu":
            raise ValueError("the outer momentum buffer must be fp32 on the CPU")
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.momentum_buffer = momentum_buffer

    def step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor) -> None:
        """θ ← θ − lr · (g + μ·m) with m ← μ·m + g (Nesterov), or θ ← θ − lr · m (plain), in place."""
        if params.shape != pseudo_gradient.shape or params.shape != self.momentum_buffer.shape:
            raise ValueError(
                f"shape mismatch: params {tuple(params.shape)}, pseudo-gradient "
                f"{tuple(pseudo_gradient.shape)}, momentum {tuple(self.momentum_buffer.shape)}"
            )
        m = self.momentum_buffer
        if self.momentum:
            m.mul_(self.momentum)
            m.add_(pseudo_gradient)
            update = torch.mul(m, self.momentum).add_(pseudo_gradient) if self.nesterov else m.clone()
        else:
            update = pseudo_gradient.clone()
        update.mul_(self.lr)
        params.sub_(update)
