"""Wire codecs of pseudo-gradient chunks and the split of the vector into per-member reduce spans."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from antorcha.averaging import codecs
from antorcha.averaging.base import AveragingGroup, GroupMember
from antorcha.averaging.codecs import CODECS, CodecError, decode, encode, encoded_size
from antorcha.averaging.spans import CHUNK_ELEMENTS, Span, span_layout


def _values(n: int = 10_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.01


def _group(*fractions: float, group_id: str = "g") -> AveragingGroup:
    members = tuple(GroupMember(f"peer-{i}", (), 1.0, f) for i, f in enumerate(fractions))
    return AveragingGroup(group_id, members)


# ---- codecs -------------------------------------------------------------------------------------------


def test_none_codec_is_exact() -> None:
    values = _values()
    values[:4] = torch.tensor([0.0, -0.0, 3.4e38, -1.4e-45])  # signed zero, huge, subnormal
    payload = encode("none", values)
    assert len(payload) == 4 * values.numel() == encoded_size("none", values.numel())
    decoded = decode("none", payload, values.numel())
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded.view(torch.int32), values.view(torch.int32)), "bitwise identical"


@pytest.mark.parametrize(("codec", "rel"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_half_codecs_have_bounded_error(codec: str, rel: float) -> None:
    values = _values(seed=1)
    payload = encode(codec, values)
    assert len(payload) == 2 * values.numel() == encoded_size(codec, values.numel())
    decoded = decode(codec, payload, values.numel())
    assert decoded.dtype == torch.float32 and decoded.shape == values.shape
    # Round-to-nearest: relative error at most half an ulp (fp16 normals start at 6.1e-5; below
    # that the absolute error is at most half the subnormal spacing 2**-25).
    error = (decoded - values).abs()
    bound = torch.maximum(values.abs() * rel, torch.full_like(values, 2**-25))
    assert bool((error <= bound).all())
    assert float(error.max()) > 0, "a half codec does lose precision"


@pytest.mark.parametrize("codec", CODECS)
def test_decode_is_deterministic_and_idempotent(codec: str) -> None:
    values = _values(seed=2)
    payload = encode(codec, values)
    first = decode(codec, payload, values.numel())
    assert torch.equal(first, decode(codec, payload, values.numel()))
    assert encode(codec, first) == payload, "re-encoding a decoded chunk gives the same bytes"


@pytest.mark.parametrize("codec", CODECS)
def test_decoded_chunks_are_independent_writable_tensors(codec: str) -> None:
    payload = encode(codec, _values(100))
    decoded = decode(codec, payload, 100)
    decoded.add_(1.0)  # the reducer accumulates into decoded values
    assert torch.equal(decode(codec, payload, 100) + 1.0, decoded)


@pytest.mark.parametrize("codec", CODECS)
def test_encode_accepts_views_and_grad_tensors(codec: str) -> None:
    base = _values(200).requires_grad_()
    view = base[::2]
    assert torch.equal(
        decode(codec, encode(codec, view), 100), decode(codec, encode(codec, view.detach().clone()), 100)
    )


@pytest.mark.parametrize("codec", CODECS)
def test_empty_chunk(codec: str) -> None:
    assert encode(codec, torch.zeros(0)) == b""
    decoded = decode(codec, b"", 0)
    assert decoded.numel() == 0 and decoded.dtype == torch.float32


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("delta", [-1, 1, -100])
def test_size_mismatch_is_a_codec_error(codec: str, delta: int) -> None:
    payload = encode(codec, _values(100))
    if not (codec == "int4" and abs(delta) == 1):  # 99, 100 and 101 int4 levels all fill 50-51 bytes
        with pytest.raises(CodecError, match=codec):
            decode(codec, payload, 100 + delta)
    with pytest.raises(CodecError):
        decode(codec, payload[:-1], 100)


def test_unknown_codec_names_the_known_ones() -> None:
    for call in (
        lambda: encode("int3", _values(4)),
        lambda: decode("int3", b"\x00" * 4, 4),
        lambda: encoded_size("int3", 4),
    ):
        with pytest.raises(CodecError, match="int3") as info:
            call()
        assert all(name in str(info.value) for name in CODECS)


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(codecs.CodecError, ValueError)


# ---- spans --------------------------------------------------------------------------------------------


def _check_tiling(spans: list[Span], total: int, members: int) -> None:
    assert [s.member_index for s in spans] == list(range(members))
    assert spans[0].start == 0
    assert spans[-1].stop == total
    for before, after in pairwise(spans):
        assert before.stop == after.start, "contiguous and disjoint"
    assert all(s.length >= 0 for s in spans)
    assert sum(s.length for s in spans) == total


@pytest.mark.parametrize("total", [0, 1, 7, 1000, 123_457, 10_000_019])
@pytest.mark.parametrize(
    "fractions", [(1.0,), (0.5, 0.5), (0.2, 0.3, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.7, 0.0, 0.3), (5.0, 1.0)]
)
def test_spans_tile_the_vector(total: int, fractions: tuple[float, ...]) -> None:
    _check_tiling(span_layout(total, _group(*fractions)), total, len(fractions))


def test_zero_or_negative_fraction_members_get_empty_spans() -> None:
    spans = span_layout(1000, _group(0.0, 0.5, -1.0, 0.5, 0.0))
    _check_tiling(spans, 1000, 5)
    assert [s.length for s in spans] == [0, 500, 0, 500, 0]


def test_span_sizes_are_proportional() -> None:
    total = 1_000_000
    spans = span_layout(total, _group(0.1, 0.2, 0.3, 0.4))
    assert [s.length for s in spans] == [100_000, 200_000, 300_000, 400_000]
    uneven = span_layout(999_983, _group(2.0, 1.0, 1.0))  # a prime total: rounding on the boundaries
    assert all(
        abs(s.length - e) <= 1 for s, e in zip(uneven, (499_991.5, 249_995.75, 249_995.75), strict=True)
    )


def test_layout_is_identical_for_the_same_input() -> None:
    fractions = (0.1 + 0.2, 0.3, 0.4000000001, 1e-3)
    first = span_layout(5_000_003, _group(*fractions))
    again = span_layout(5_000_003, _group(*fractions, group_id="other"))
    assert first == again
    # Fractions that differ only by float summation order land on the same boundaries.
    assert span_layout(1_000_003, _group(0.1 + 0.2, 0.7)) == span_layout(1_000_003, _group(0.3, 0.7))


@pytest.mark.parametrize("fractions", [(0.0,), (0.0, 0.0), (-0.5, 0.0)])
def test_no_reducer_is_a_value_error(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="g-42 has no member that can reduce"):
        span_layout(100, _group(*fractions, group_id="g-42"))


def test_tiny_positive_fractions_still_give_a_layout_or_value_error() -> None:
    """A group whose fractions are all positive but below 1e-6 must not crash with ZeroDivisionError."""
    try:
        spans = span_layout(1000, _group(1e-7, 1e-7))
    except ValueError:
        return
    _check_tiling(spans, 1000, 2)


@pytest.mark.parametrize(
    ("start", "stop", "chunk"),
    [(0, 10, 3), (5, 5, 4), (7, 8, 100), (100, 100 + 2 * CHUNK_ELEMENTS + 1, None)],
)
def test_chunks_cover_the_span(start: int, stop: int, chunk: int | None) -> None:
    span = Span(0, start, stop)
    size = CHUNK_ELEMENTS if chunk is None else chunk
    chunks = span.chunks() if chunk is None else span.chunks(chunk)
    if start == stop:
        assert chunks == []
        return
    assert chunks[0][0] == start and chunks[-1][1] == stop
    for (_, hi), (lo, _) in pairwise(chunks):
        assert hi == lo
    assert all(0 < hi - lo <= size for lo, hi in chunks)
    assert all(hi - lo == size for lo, hi in chunks[:-1])
    assert len(chunks) == -(-span.length // size)


def test_default_chunk_fits_a_message() -> None:
    assert CHUNK_ELEMENTS * 4 <= 4 * 1024 * 1024 - 64 * 1024
