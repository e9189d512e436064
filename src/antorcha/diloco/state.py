"""The global state of a round (θ_r and the outer momentum) and its byte form for transfer and disk.

The byte form is safetensors: no pickle, so a state from an untrusted peer can be parsed safely, and
the parameter checksum travels in its metadata and is re-verified on decoding.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from antorcha.diloco.checksum import tensor_checksum
from antorcha.diloco.params import LayoutMismatchError, ParamLayout
from antorcha.diloco.pseudo_gradient import all_finite

_PARAM = "param/"
_MOMENTUM = "outer_momentum/"


class CorruptStateError(ValueError):
    """A serialized state failed to parse or its checksum does not match its content."""


@dataclass
class GlobalState:
    round: int
    params: torch.Tensor  # flat fp32 CPU
    momentum: torch.Tensor  # flat fp32 CPU, same size

    @property
    def checksum(self) -> str:
        return tensor_checksum(self.params)


def encode_state(layout: ParamLayout, state: GlobalState, run_id: str) -> bytes:
    tensors = {_PARAM + n: t.contiguous() for n, t in layout.to_named(state.params).items()}
    tensors |= {_MOMENTUM + n: t.contiguous() for n, t in layout.to_named(state.momentum).items()}
    meta = {
        "round": str(state.round),
        "run_id": run_id,
        "checksum": state.checksum,
        "content_sha256": _content_hash(state, run_id),
    }
    return st_save(tensors, metadata=meta)


def _content_hash(state: GlobalState, run_id: str) -> str:
    """Covers everything a replica adopts: parameters, outer momentum, round and run."""
    h = hashlib.sha256(f"{run_id}\n{state.round}\n".encode())
    for t in (state.params, state.momentum):
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def decode_state(layout: ParamLayout, data: bytes, run_id: str) -> GlobalState:
    try:
        tensors = st_load(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, struct.error) as e:
        raise CorruptStateError(f"state is not valid safetensors: {e}") from e
    if meta.get("run_id") != run_id:
        raise CorruptStateError(f"state belongs to run {meta.get('run_id')!r}, expected {run_id!r}")
    try:
        params = layout.from_named({k[len(_PARAM) :]: v for k, v in tensors.items() if k.startswith(_PARAM)})
        momentum = layout.from_named(
            {k[len(_MOMENTUM) :]: v for k, v in tensors.items() if k.startswith(_MOMENTUM)}
        )
    except LayoutMismatchError as e:
        raise CorruptStateError(str(e)) from e
    state = GlobalState(round=int(meta.get("round", "-1")), params=params, momentum=momentum)
    if state.checksum != meta.get("checksum"):
        raise CorruptStateError("state checksum does not match its parameters")
    if _content_hash(state, run_id) != meta.get("content_sha256"):
        raise CorruptStateError("state content hash does not match (momentum or round altered)")
    if not (all_finite(params) and all_finite(momentum)):
        raise CorruptStateError("state holds non-finite values")
    return state


def _metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
