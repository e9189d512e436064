"""The global state's byte form (safetensors + checksum), the flat parameter layout, and checksums.

Decoding must give back exactly what was encoded, and refuse anything else (corrupted, truncated,
foreign, another run's or another model's state, non-finite values) with CorruptStateError.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from antorcha.diloco.checksum import tensor_checksum
from antorcha.diloco.params import LayoutMismatchError, ParamLayout
from antorcha.diloco.state import CorruptStateError, GlobalState, decode_state, encode_state, sha256_hex
from antorcha.model import build_model
from antorcha.model.llama import LlamaLM

RUN = "run-test"


@pytest.fixture(scope="module")
def model() -> LlamaLM:
    return build_model("nano", 256, 64, seed=7)


@pytest.fixture(scope="module")
def layout(model: LlamaLM) -> ParamLayout:
    return ParamLayout.of(model)


@pytest.fixture(scope="module")
def state(model: LlamaLM, layout: ParamLayout) -> GlobalState:
    momentum = torch.randn(layout.total, generator=torch.Generator().manual_seed(1))
    return GlobalState(round=5, params=layout.flatten(model), momentum=momentum)


@pytest.fixture(scope="module")
def encoded(layout: ParamLayout, state: GlobalState) -> bytes:
    return encode_state(layout, state, RUN)


def _data_offsets(data: bytes) -> tuple[int, dict[str, tuple[int, int]]]:
    """Start of the tensor data and each tensor's [begin, end) within it, read from the header."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    offsets = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
    return 8 + header_len, offsets


def _flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    corrupted = bytearray(data)
    corrupted[position] ^= mask
    return bytes(corrupted)


# ---- round trip -------------------------------------------------------------------------------------


def test_round_trip_is_exact(layout: ParamLayout, state: GlobalState, encoded: bytes) -> None:
    decoded = decode_state(layout, encoded, RUN)
    assert decoded.round == 5
    assert decoded.params.dtype == torch.float32 and decoded.momentum.dtype == torch.float32
    assert torch.equal(decoded.params, state.params)
    assert torch.equal(decoded.momentum, state.momentum)
    assert decoded.checksum == state.checksum


def test_encoding_stores_every_tensor_and_the_metadata(layout: ParamLayout, encoded: bytes) -> None:
    # (The byte form itself is not canonical: safetensors writes the metadata keys in hash order.)
    data_start, offsets = _data_offsets(encoded)
    assert set(offsets) == {p + n for p in ("param/", "outer_momentum/") for n in layout.names}
    assert len(encoded) == data_start + 2 * 4 * layout.total
    header = json.loads(encoded[8:data_start])
    assert header["__metadata__"]["run_id"] == RUN
    assert header["__metadata__"]["round"] == "5"
    assert sha256_hex(encoded) == sha256_hex(bytes(encoded))
    assert sha256_hex(encoded) != sha256_hex(encoded[:-1])
    assert len(sha256_hex(encoded)) == 64


def test_decoded_params_load_into_a_fresh_model(layout: ParamLayout, encoded: bytes, model: LlamaLM) -> None:
    other = build_model("nano", 256, 64, seed=99)
    assert not torch.equal(layout.flatten(other), layout.flatten(model))
    layout.load_into(other, decode_state(layout, encoded, RUN).params)
    assert torch.equal(layout.flatten(other), layout.flatten(model))


# ---- corruption ---------------------------------------------------------------------------------------


def test_flipped_byte_in_parameters_is_detected(layout: ParamLayout, encoded: bytes) -> None:
    data_start, offsets = _data_offsets(encoded)
    name = next(k for k in offsets if k.startswith("param/"))
    position = data_start + offsets[name][0] + 4  # low mantissa bit of the second element: still finite
    with pytest.raises(CorruptStateError, match="checksum"):
        decode_state(layout, _flip(encoded, position), RUN)


def test_flipped_byte_in_momentum_is_detected(layout: ParamLayout, encoded: bytes) -> None:
    """The outer momentum is half of the state: a corrupted momentum must not be silently accepted."""
    data_start, offsets = _data_offsets(encoded)
    name = next(k for k in offsets if k.startswith("outer_momentum/"))
    position = data_start + offsets[name][0] + 4  # a finite value changes by one ulp
    with pytest.raises(CorruptStateError):
        decode_state(layout, _flip(encoded, position), RUN)


@pytest.mark.parametrize(
    "position",
    [0, 8, 9],
    ids=["header-length", "header-open-brace", "header-first-key"],
)
def test_flipped_byte_in_header_is_detected(layout: ParamLayout, encoded: bytes, position: int) -> None:
    with pytest.raises(CorruptStateError):
        decode_state(layout, _flip(encoded, position, 0x40), RUN)


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -1, -1000], ids=lambda k: f"keep{k}")
def test_truncated_state_is_refused(layout: ParamLayout, encoded: bytes, keep: int) -> None:
    with pytest.raises(CorruptStateError):
        decode_state(layout, encoded[:keep], RUN)


@pytest.mark.parametrize(
    "garbage",
    [
        b"not a state at all",
        bytes(range(256)) * 64,
        struct.pack("<Q", 10**12) + b"{}",
        struct.pack("<Q", 2) + b"[]",
    ],
    ids=["text", "bytes", "huge-header-length", "header-not-object"],
)
def test_garbage_is_refused(layout: ParamLayout, garbage: bytes) -> None:
    with pytest.raises(CorruptStateError):
        decode_state(layout, garbage, RUN)


def test_random_bytes_are_refused(layout: ParamLayout) -> None:
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with pytest.raises(CorruptStateError):
        decode_state(layout, noise.numpy().tobytes(), RUN)


def test_foreign_safetensors_are_refused(layout: ParamLayout) -> None:
    foreign = st_save({"weight": torch.zeros(3)}, metadata={"run_id": RUN, "round": "1"})
    with pytest.raises(CorruptStateError, match="lacks parameters"):
        decode_state(layout, foreign, RUN)


def test_other_run_is_refused(layout: ParamLayout, encoded: bytes) -> None:
    with pytest.raises(CorruptStateError, match="other-run") as info:
        decode_state(layout, encoded, "other-run")
    assert RUN in str(info.value)


@pytest.mark.parametrize(
    ("size", "vocab"), [("micro", 256), ("nano", 512)], ids=["other-preset", "other-vocab"]
)
def test_state_of_another_model_is_refused(layout: ParamLayout, size: str, vocab: int) -> None:
    other = build_model(size, vocab, 64, seed=0)
    other_layout = ParamLayout.of(other)
    params = other_layout.flatten(other)
    data = encode_state(other_layout, GlobalState(1, params, torch.zeros_like(params)), RUN)
    assert decode_state(other_layout, data, RUN).round == 1  # valid for its own model
    with pytest.raises(CorruptStateError, match="wrong shapes"):
        decode_state(layout, data, RUN)


@pytest.mark.parametrize("where", ["params", "momentum"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_state_is_refused(layout: ParamLayout, state: GlobalState, where: str, bad: float) -> None:
    params, momentum = state.params.clone(), state.momentum.clone()
    (params if where == "params" else momentum)[17] = bad
    data = encode_state(layout, GlobalState(2, params, momentum), RUN)  # checksum matches the bad values
    with pytest.raises(CorruptStateError, match="non-finite"):
        decode_state(layout, data, RUN)


# ---- ParamLayout --------------------------------------------------------------------------------------


def test_layout_matches_the_model(model: LlamaLM, layout: ParamLayout) -> None:
    named = list(model.named_parameters())
    assert layout.names == tuple(n for n, _ in named)
    assert layout.total == sum(p.numel() for _, p in named)
    assert layout.numels == tuple(p.numel() for _, p in named)
    assert ParamLayout.of(build_model("nano", 256, 64, seed=1)) == layout, "the layout ignores the values"


def test_flatten_and_load_into_round_trip(model: LlamaLM, layout: ParamLayout) -> None:
    flat = layout.flatten(model)
    assert flat.shape == (layout.total,) and flat.dtype == torch.float32
    # flatten copies: changing the vector leaves the model alone
    flat[0] += 1.0
    assert not torch.equal(layout.flatten(model), flat)
    flat[0] -= 1.0

    target = build_model("nano", 256, 64, seed=123)
    values = torch.linspace(-1, 1, layout.total)
    layout.load_into(target, values)
    assert torch.equal(layout.flatten(target), values)
    for (name, param), piece, shape in zip(
        target.named_parameters(), layout.split(values), layout.shapes, strict=True
    ):
        assert tuple(param.shape) == shape, name
        assert torch.equal(param.detach().reshape(-1), piece), name


def test_to_named_and_from_named_round_trip(layout: ParamLayout) -> None:
    values = torch.arange(layout.total, dtype=torch.float32)
    named = layout.to_named(values)
    assert list(named) == list(layout.names)
    assert all(tuple(t.shape) == s for t, s in zip(named.values(), layout.shapes, strict=True))
    assert torch.equal(layout.from_named(named), values)


def test_load_into_casts_to_the_model_dtype(layout: ParamLayout) -> None:
    target = build_model("nano", 256, 64, seed=0).to(torch.bfloat16)
    values = torch.linspace(-2, 2, layout.total)
    layout.load_into(target, values)
    assert all(p.dtype == torch.bfloat16 for p in target.parameters())
    assert torch.equal(layout.flatten(target), values.to(torch.bfloat16).to(torch.float32))


@pytest.mark.parametrize("delta", [-1, 1, -1000])
def test_load_into_refuses_wrong_size(model: LlamaLM, layout: ParamLayout, delta: int) -> None:
    before = layout.flatten(model)
    with pytest.raises(LayoutMismatchError, match=str(layout.total)):
        layout.load_into(model, torch.zeros(layout.total + delta))
    assert torch.equal(layout.flatten(model), before), "a refused vector changes nothing"


def test_layout_refuses_another_model(layout: ParamLayout) -> None:
    other = build_model("micro", 256, 64, seed=0)
    with pytest.raises(LayoutMismatchError):
        layout.flatten(other)
    with pytest.raises(LayoutMismatchError):
        layout.load_into(other, torch.zeros(layout.total))


def test_from_named_refuses_missing_or_misshapen(layout: ParamLayout) -> None:
    named = layout.to_named(torch.zeros(layout.total))
    missing = dict(named)
    del missing[layout.names[0]]
    with pytest.raises(LayoutMismatchError, match="lacks"):
        layout.from_named(missing)
    misshapen = dict(named)
    misshapen[layout.names[-1]] = torch.zeros(3, 3)
    with pytest.raises(LayoutMismatchError, match="wrong shapes"):
        layout.from_named(misshapen)


# ---- checksum -----------------------------------------------------------------------------------------


def test_checksum_depends_on_bytes_only() -> None:
    values = torch.linspace(-3, 3, 1000)
    digest = tensor_checksum(values)
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert tensor_checksum(values.clone()) == digest
    strided = torch.stack([values, values], dim=1)[:, 0]  # same values, not contiguous
    assert not strided.is_contiguous()
    assert tensor_checksum(strided) == digest

    changed = values.clone()
    changed[500] = torch.nextafter(changed[500], torch.tensor(10.0))
    assert tensor_checksum(changed) != digest
    assert tensor_checksum(torch.tensor([0.0])) != tensor_checksum(torch.tensor([-0.0])), "bytes differ"
    assert tensor_checksum(values.to(torch.float64)) != digest


def test_state_checksum_covers_params(state: GlobalState) -> None:
    assert state.checksum == tensor_checksum(state.params)
