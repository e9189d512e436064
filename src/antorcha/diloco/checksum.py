"""Checksums that replicas compare after every outer step: equal if and only if the bytes are equal."""

from __future__ import annotations

import hashlib

import torch


def tensor_checksum(flat: torch.Tensor) -> str:
    """sha256 (first 32 hex digits) of a contiguous CPU tensor's raw bytes."""
    data = flat.detach().to("cpu").contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()[:32]
