"""Tokenizers a run can name: raw UTF-8 bytes (the default, no dependency) or a Hugging Face tokenizer.

Owns turning documents into token ids, the vocabulary size a model must cover, what separates two
documents in the token stream, and a fingerprint of the tokenizer itself (two machines with different
tokenizer files would produce different tokens for the same text, so the fingerprint goes into the
corpus fingerprint). Hugging Face tokenizers need the optional ``antorcha[hf]`` extra.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from antorcha.data.corpus import BYTE_VOCAB_SIZE, FILE_SEPARATOR

BYTES = "bytes"
HF_EXTRA_HINT = "install the optional extra: pip install 'antorcha[hf]'"


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or does not fit the run."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int  # every id it produces is < vocab_size
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def separator(self) -> list[int]:
        """Ids appended after each document, so the model sees where one ends."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: the tokenizer of the built-in corpus."""

    name = BYTES
    vocab_size = BYTE_VOCAB_SIZE
    fingerprint = "bytes-utf8"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def separator(self) -> list[int]:
        return list(FILE_SEPARATOR)


def require(module: str) -> Any:
    """Import an optional dependency or say which extra provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TokenizerError(f"{module} is not installed; {HF_EXTRA_HINT}") from e


class HFTokenizer:
    """A Hugging Face (preferably fast) tokenizer loaded from a local directory or the Hub."""

    def __init__(self, name: str) -> None:
        transformers = require("transformers")
        local = Path(name).expanduser()
        if (name.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {name}")
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot load tokenizer {name!r}: {e}") from e
        self.name = name
        # len() counts added special tokens too, which .vocab_size leaves out.
        self.vocab_size = len(self._tok)
        self.fingerprint = self._fingerprint()
        eos = self._tok.eos_token_id
        # Without an end-of-text token, a blank line marks document boundaries, as with bytes.
        self._separator = [int(eos)] if eos is not None else self._encode_plain(["\n\n"])[0]

    def _fingerprint(self) -> str:
        backend = getattr(self._tok, "backend_tokenizer", None)
        # Fast tokenizers serialize their whole pipeline deterministically; slow ones give the vocabulary.
        text = backend.to_str() if backend is not None else json.dumps(sorted(self._tok.get_vocab().items()))
        return "hf-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        # No BOS/EOS from the tokenizer's template: document boundaries are ours (see separator()).
        out = self._tok(texts, add_special_tokens=False, return_attention_mask=False)
        return [list(ids) for ids in out["input_ids"]]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode_plain(texts) if texts else []

    def separator(self) -> list[int]:
        return list(self._separator)


def load_tokenizer(name: str) -> Tokenizer:
    """``"bytes"`` or a Hugging Face tokenizer directory / Hub name."""
    if not name:
        raise TokenizerError("tokenizer name is empty; use 'bytes' or a tokenizer directory / Hub name")
    if name == BYTES:
        return ByteTokenizer()
    return HFTokenizer(name)


def tokenize_documents(tokenizer: Tokenizer, texts: Iterable[str], batch_size: int = 256) -> list[list[int]]:
    """Token ids of each text, with the separator appended, in order; batched for the fast tokenizers."""
    sep = tokenizer.separator()
    out: list[list[int]] = []
    batch: list[str] = []

    def flush() -> None:
        out.extend(ids + sep for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    flush()
    return out
