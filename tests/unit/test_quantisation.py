"""Quantised codecs (int8, int4 with per-block scales): error bounds, wire size, bad payloads, and
error feedback carrying the residual from one round to the next."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from antorcha.averaging.codecs import BITS, QUANT_BLOCK, CodecError, decode, encode, encoded_size, roundtrip

QUANTISED = {"int8": 127, "int4": 7}


def _values(n: int, seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("codec", sorted(QUANTISED))
@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 4097])
def test_error_is_at_most_half_a_step_of_each_blocks_scale(codec: str, n: int) -> None:
    qmax = QUANTISED[codec]
    values = _values(n, seed=n)
    values[0] = 0.0
    decoded = roundtrip(codec, values)
    assert decoded.shape == values.shape and decoded.dtype == torch.float32
    for start in range(0, n, QUANT_BLOCK):
        block = values[start : start + QUANT_BLOCK]
        step = float(block.abs().max()) / qmax
        error = (decoded[start : start + QUANT_BLOCK] - block).abs()
        # Half a quantisation step, plus fp32 rounding of the scale and of the product.
        assert float(error.max()) <= 0.5 * step * (1 + 1e-5) + 1e-12
    biggest = int(values.abs().argmax())
    assert math.isclose(float(decoded[biggest]), float(values[biggest]), rel_tol=1e-6), "absmax is exact"


@pytest.mark.parametrize("codec", sorted(QUANTISED))
def test_blocks_have_their_own_scale(codec: str) -> None:
    """A huge value in one block must not wipe out the small values of the next block."""
    values = _values(2 * QUANT_BLOCK, seed=3, scale=1e-4)
    values[0] = 100.0
    decoded = roundtrip(codec, values)
    second = slice(QUANT_BLOCK, 2 * QUANT_BLOCK)
    relative = (decoded[second] - values[second]).norm() / values[second].norm()
    assert float(relative) < (0.02 if codec == "int8" else 0.3)
    assert float(decoded[1:QUANT_BLOCK].abs().max()) == 0.0, "the first block's small values round to 0"


@pytest.mark.parametrize("codec", sorted(QUANTISED))
def test_wire_size_is_bits_per_value_plus_one_scale_per_block(codec: str) -> None:
    n = 10_000
    payload = encode(codec, _values(n))
    blocks = math.ceil(n / QUANT_BLOCK)
    assert len(payload) == encoded_size(codec, n) == 4 * blocks + math.ceil(n * BITS[codec] / 8)
    assert len(payload) * 8 / n < BITS[codec] * 1.04, "scales cost under 4 % on top of the levels"


@pytest.mark.parametrize("codec", sorted(QUANTISED))
def test_zeros_and_constant_blocks(codec: str) -> None:
    assert torch.equal(roundtrip(codec, torch.zeros(300)), torch.zeros(300))
    constant = torch.full((300,), -0.25)
    assert torch.equal(roundtrip(codec, constant), constant)


@pytest.mark.parametrize("codec", sorted(QUANTISED))
def test_decoding_is_bitwise_reproducible(codec: str) -> None:
    payload = encode(codec, _values(5000, seed=9))
    first = decode(codec, payload, 5000)
    assert torch.equal(first.view(torch.int32), decode(codec, payload, 5000).view(torch.int32))


@pytest.mark.parametrize("codec", sorted(QUANTISED))
def test_a_nan_scale_decodes_to_nan_for_the_reducer_to_refuse(codec: str) -> None:
    payload = bytearray(encode(codec, _values(300)))
    payload[0:4] = struct.pack("<f", float("nan"))
    decoded = decode(codec, bytes(payload), 300)
    assert not bool(torch.isfinite(decoded[:QUANT_BLOCK]).all())
    assert bool(torch.isfinite(decoded[QUANT_BLOCK:]).all()), "only the block of the bad scale"


def test_an_int4_level_outside_the_range_is_refused() -> None:
    payload = bytearray(encode("int4", _values(8)))
    payload[4] = 0x00  # nibble 0 would be level -8, which the encoder never writes
    with pytest.raises(CodecError, match="outside"):
        decode("int4", bytes(payload), 8)


def test_int4_is_coarser_than_int8_which_is_coarser_than_fp16() -> None:
    values = _values(50_000, seed=5)
    errors = {
        c: float((roundtrip(c, values) - values).norm() / values.norm()) for c in ("fp16", "int8", "int4")
    }
    assert errors["fp16"] < errors["int8"] < errors["int4"] < 0.25


@pytest.mark.parametrize("codec", sorted(QUANTISED))
def test_error_feedback_carries_the_residual_so_the_sum_sent_tracks_the_sum_meant(codec: str) -> None:
    """With error feedback, what was sent over many rounds differs from what was meant by at most one
    round's residual; without it the quantisation bias of a steady signal accumulates."""
    rounds, n = 50, 2000
    steady = _values(n, seed=11)  # the same pseudo-gradient every round: the worst case for bias
    residual = torch.zeros(n)
    sent_with, sent_without = torch.zeros(n), torch.zeros(n)
    for _ in range(rounds):
        outgoing = steady + residual
        sent = roundtrip(codec, outgoing)
        residual = outgoing - sent
        sent_with += sent
        sent_without += roundtrip(codec, steady)
    meant = steady * rounds
    drift_with = float((sent_with - meant).abs().max())
    assert torch.allclose(sent_with + residual, meant, atol=1e-5), "sent + carried residual = meant"
    assert drift_with <= float(residual.abs().max()) + 1e-5
    assert float((sent_without - meant).abs().max()) > 5 * drift_with
