"""Encodings of pseudo-gradient chunks on the wire. A codec must decode the same bytes to the same
values on every machine, so that a reducer's one encoded average gives identical replicas.

Float codecs (`none`, `fp16`, `bf16`) cast. Quantised codecs (`int8`, `int4`) split a chunk into
blocks of `QUANT_BLOCK` elements, each with its own fp32 scale (absmax / qmax), and round every value
to the nearest level in [-qmax, qmax]. Payload layout: the block scales (fp32, little endian), then
the levels (int8: one byte each; int4: two per byte, low nibble first, stored as level + 8). Decoding
is one exact int→float conversion and one fp32 multiply per value, so it is bitwise reproducible.
"""

from __future__ import annotations

import math

import torch

CODECS = ("none", "fp16", "bf16", "int8", "int4")
BITS = {"none": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
LOSSY = frozenset(CODECS) - {"none"}
QUANT_BLOCK = 256
_FLOAT_DTYPES = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QMAX = {"int8": 127, "int4": 7}


class CodecError(ValueError):
    """Bytes that do not decode to the expected number of elements, or an unknown codec."""


def _check(codec: str) -> None:
    if codec not in BITS:
        raise CodecError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def encoded_size(codec: str, num_elements: int) -> int:
    _check(codec)
    if codec in _FLOAT_DTYPES:
        return num_elements * BITS[codec] // 8
    blocks = math.ceil(num_elements / QUANT_BLOCK)
    levels = num_elements if codec == "int8" else (num_elements + 1) // 2
    return 4 * blocks + levels


def encode(codec: str, values: torch.Tensor) -> bytes:
    _check(codec)
    flat = values.detach().to("cpu", torch.float32).reshape(-1)
    if codec in _FLOAT_DTYPES:
        return flat.to(_FLOAT_DTYPES[codec]).contiguous().view(torch.uint8).numpy().tobytes()
    return _encode_quantised(codec, flat)


def decode(codec: str, payload: bytes, num_elements: int) -> torch.Tensor:
    _check(codec)
    if len(payload) != encoded_size(codec, num_elements):
        raise CodecError(f"{codec} payload of {len(payload)} bytes cannot hold {num_elements} elements")
    if num_elements == 0:
        return torch.zeros(0, dtype=torch.float32)
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if codec in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[codec]).to(torch.float32)
    return _decode_quantised(codec, raw, num_elements)


def roundtrip(codec: str, values: torch.Tensor) -> torch.Tensor:
    """What the receiver of `encode(codec, values)` will see: the basis of error feedback."""
    return decode(codec, encode(codec, values), values.numel())


def _encode_quantised(codec: str, flat: torch.Tensor) -> bytes:
    qmax = _QMAX[codec]
    n = flat.numel()
    blocks = math.ceil(n / QUANT_BLOCK)
    padded = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float32)
    padded[:n] = flat
    padded = padded.view(blocks, QUANT_BLOCK)
    scales = padded.abs().amax(dim=1) / qmax
    # A zero block has scale 0 and decodes to zeros whatever its levels; divide by 1 to avoid 0/0.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    levels = torch.round(padded / divisor[:, None]).clamp_(-qmax, qmax).to(torch.int8).reshape(-1)[:n]
    scale_bytes = scales.contiguous().view(torch.uint8).numpy().tobytes()
    if codec == "int8":
        return scale_bytes + levels.view(torch.uint8).numpy().tobytes()
    nibbles = (levels.to(torch.int16) + 8).to(torch.uint8)
    if n % 2:
        nibbles = torch.cat([nibbles, torch.full((1,), 8, dtype=torch.uint8)])
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return scale_bytes + packed.numpy().tobytes()


def _decode_quantised(codec: str, raw: torch.Tensor, n: int) -> torch.Tensor:
    blocks = math.ceil(n / QUANT_BLOCK)
    scales = raw[: 4 * blocks].view(torch.float32)
    body = raw[4 * blocks :]
    if codec == "int8":
        levels = body.view(torch.int8).to(torch.float32)
    else:
        low, high = (body & 0x0F).to(torch.int16) - 8, (body >> 4).to(torch.int16) - 8
        nibble_levels = torch.stack([low, high], dim=1).reshape(-1)[:n]
        if bool((nibble_levels < -_QMAX[codec]).any()):
            raise CodecError("int4 payload holds a level outside [-7, 7]")
        levels = nibble_levels.to(torch.float32)
    per_value = scales.repeat_interleave(QUANT_BLOCK)[:n]
    return torch.mul(levels, per_value)
