"""Which accelerator this worker trains on, and how to describe it to the coordinator."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from antorcha.protocol import DeviceInfo


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA GPU")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was requested but it is not available")
    return torch.device(requested)


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", props.name, int(props.total_memory))
    memory = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceInfo(device.type, platform.processor() or platform.machine(), int(memory))
