"""Proof of possession for session credentials: what a worker signs on every RPC and how the
coordinator checks it.

At Join the worker sends the public half of a fresh Ed25519 key pair and gets a session id. Every later
RPC carries, in its gRPC metadata, the session id, a time stamp, a random nonce and an Ed25519
signature over (method, session id, time, nonce, SHA-256 of the request's deterministic encoding).
So a leaked session id is useless without the private key (a different peer cannot replay it), a
recorded request cannot be sent again (nonce seen, or time stamp too old), and a request body cannot
be altered in flight even without TLS.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SESSION_KEY = "antorcha-session"
TIME_KEY = "antorcha-time"
NONCE_KEY = "antorcha-nonce"
SIGNATURE_KEY = "antorcha-signature"
OPERATOR_KEY = "authorization"  # "Bearer <operator token>"
PUBLIC_KEY_BYTES = 32


class SignatureError(Exception):
    """A signed request did not check out; the message says which part."""


def signed_message(method: str, session_id: str, stamp: str, nonce: str, body: bytes) -> bytes:
    return b"\n".join(
        [
            b"antorcha-rpc-v1",
            method.encode(),
            session_id.encode(),
            stamp.encode(),
            nonce.encode(),
            hashlib.sha256(body).hexdigest().encode(),
        ]
    )


@dataclass(frozen=True)
class SignedParts:
    session_id: str
    stamp: float
    nonce: str
    signature: bytes
    stamp_text: str


class SessionKey:
    """The worker's key pair for one session; signs each call's metadata."""

    def __init__(self) -> None:
        self._private = Ed25519PrivateKey.generate()
        self.session_id = ""
        self.clock_offset_s = 0.0  # coordinator clock − ours, learned at Join

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def metadata(self, method: str, body: bytes) -> list[tuple[str, str]]:
        if not self.session_id:
            return []
        stamp = f"{time.time() + self.clock_offset_s:.3f}"
        nonce = secrets.token_hex(16)
        signature = self._private.sign(signed_message(method, self.session_id, stamp, nonce, body))
        return [
            (SESSION_KEY, self.session_id),
            (TIME_KEY, stamp),
            (NONCE_KEY, nonce),
            (SIGNATURE_KEY, signature.hex()),
        ]


def read_signed(metadata: Mapping[str, str]) -> SignedParts | None:
    """The signature parts of a call's metadata; None when it carries no session at all."""
    session_id = metadata.get(SESSION_KEY, "")
    if not session_id:
        return None
    stamp_text, nonce, signature = (metadata.get(k, "") for k in (TIME_KEY, NONCE_KEY, SIGNATURE_KEY))
    try:
        stamp = float(stamp_text)
        raw = bytes.fromhex(signature)
    except ValueError:
        raise SignatureError("the request's time stamp or signature is not readable") from None
    if not 16 <= len(nonce) <= 64 or len(raw) != 64 or len(session_id) > 128:
        raise SignatureError("the request's nonce, signature or session id has the wrong size")
    return SignedParts(session_id, stamp, nonce, raw, stamp_text)


def verify(public_key: bytes, method: str, parts: SignedParts, body: bytes) -> None:
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        message = signed_message(method, parts.session_id, parts.stamp_text, parts.nonce, body)
        key.verify(parts.signature, message)
    except (InvalidSignature, ValueError):
        raise SignatureError(
            "the request's signature does not match the session's key: the session id is being used by a "
            "peer that does not hold its key (replayed credential), or the request was altered"
        ) from None


def metadata_dict(pairs: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {k: v for k, v in (pairs or ()) if isinstance(v, str)}
