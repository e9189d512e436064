"""Encodings of pseudo-gradient chunks on the wire. A codec must decode the same bytes to the same
values on every machine, so that a reducer's one encoded average gives identical replicas."""

from __future__ import annotations

import torch

CODECS = ("none", "fp16", "bf16")
_DTYPES = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CodecError(ValueError):
    """Bytes that do not decode to the expected number of elements, or an unknown codec."""


def _dtype(codec: str) -> torch.dtype:
    try:
        return _DTYPES[codec]
    except KeyError:
        raise CodecError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}") from None


def encode(codec: str, values: torch.Tensor) -> bytes:
    dtype = _dtype(codec)
    return values.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()


def decode(codec: str, payload: bytes, num_elements: int) -> torch.Tensor:
    dtype = _dtype(codec)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    if len(payload) != num_elements * itemsize:
        raise CodecError(f"{codec} payload of {len(payload)} bytes cannot hold {num_elements} elements")
    if num_elements == 0:
        return torch.zeros(0, dtype=torch.float32)
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return raw.view(dtype).to(torch.float32)


def encoded_size(codec: str, num_elements: int) -> int:
    return num_elements * torch.tensor([], dtype=_dtype(codec)).element_size()
