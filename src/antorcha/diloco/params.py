"""The flat fp32 view of a model's parameters that every replica agrees on.

Replicas exchange, average and hash one flat vector, so the order and shapes of parameters must be
the same everywhere: `ParamLayout` records them (from `named_parameters()`) and moves values between
the flat vector and a model, whatever device or dtype the model lives on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class LayoutMismatchError(ValueError):
    """A state or vector does not fit this model's parameter layout."""


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.numels)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """Copy the model's parameters into a new fp32 CPU vector."""
        params = dict(model.named_parameters())
        self._check_names(params)
        return torch.cat([params[n].detach().to("cpu", torch.float32).reshape(-1) for n in self.names])

    def load_into(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Overwrite the model's parameters with the values of `flat` (cast to each parameter's dtype)."""
        if flat.numel() != self.total:
            raise LayoutMismatchError(f"vector has {flat.numel()} elements, layout needs {self.total}")
        params = dict(model.named_parameters())
        self._check_names(params)
        with torch.no_grad():
            for name, piece in zip(self.names, self.split(flat), strict=True):
                target = params[name]
                target.copy_(piece.view(target.shape).to(target.device, target.dtype))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, list(self.numels)))

    def to_named(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: p.view(s) for n, p, s in zip(self.names, self.split(flat), self.shapes, strict=True)}

    def from_named(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise LayoutMismatchError(f"state lacks parameters {missing[:3]}")
        wrong = [n for n, s in zip(self.names, self.shapes, strict=True) if tuple(tensors[n].shape) != s]
        if wrong:
            raise LayoutMismatchError(f"state has wrong shapes for {wrong[:3]}")
        return torch.cat([tensors[n].to(torch.float32).reshape(-1) for n in self.names])

    def _check_names(self, params: dict[str, nn.Parameter]) -> None:
        if tuple(params) != self.names:
            raise LayoutMismatchError("model parameters differ from the layout")
