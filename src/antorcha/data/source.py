"""The one place a run's token stream is built: run spec in, train/eval token tensors out.

Owns the choice between the built-in corpus and the user's data (local files, Hugging Face datasets),
tokenizing documents into one stream with a separator after each, the document-level train/eval split
(a stable hash of each document's key, so the split never depends on the other documents or on the
machine), the corpus fingerprint that covers the tokenizer too, and the local token cache of Hugging
Face datasets. The coordinator's replica, the workers and the experiments all call ``load_run_data``:
the same spec gives bitwise the same tokens, which is what lets shards be plain index ranges.

With the defaults (built-in source, bytes tokenizer) the result is exactly ``load_stdlib_corpus``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from antorcha.config import DataSpec, RunSpec
from antorcha.data.corpus import (
    FILE_SEPARATOR,
    Corpus,
    fingerprint,
    is_eval_file,
    load_stdlib_corpus,
    split_score,
)
from antorcha.data.files import DataSourceError, Document, file_documents
from antorcha.data.sampling import ShardReader
from antorcha.data.tokenizers import BYTES, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
CACHE_ENV = "ANTORCHA_DATA_CACHE_DIR"  # where tokens of hf datasets are cached; "off" disables
ENCODE_BATCH = 256  # documents per tokenizer call: fast tokenizers parallelise within a call


@dataclass(frozen=True)
class RunData:
    corpus: Corpus
    vocab_size: int  # the model's vocabulary must cover this many ids
    tokenizer: str


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed-or-byte dtype that holds every id (readers widen to int64 per batch)."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 2**15:
        return torch.int16
    return torch.int32


def documents(spec: DataSpec) -> Iterator[Document]:
    """The spec's documents in their fixed order, cut at ``max_documents``."""
    if spec.source in ("text", "jsonl", "parquet"):
        docs = file_documents(spec.source, spec.paths, spec.text_field)
    elif spec.source == "hf":
        from antorcha.data.hf import hf_documents  # imports datasets: only when asked for

        docs = hf_documents(spec)
    else:
        raise DataSourceError(f"data source {spec.source!r} has no documents to read")
    return itertools.islice(docs, spec.max_documents) if spec.max_documents else docs


def _batched(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def tokenize_corpus(docs: Iterable[Document], tokenizer: Tokenizer, spec: DataSpec, source: str) -> Corpus:
    """Tokenize ``docs`` in order, each followed by the separator, into a train and an eval stream.

    A document goes to eval when the hash of its key says so. When a split would be empty (tiny data),
    one document moves over: the one whose hash is nearest the threshold; a single document is cut at
    the eval fraction instead. Reading stops once ``max_tokens`` tokens are collected.
    """
    sep = tokenizer.separator()
    kept: list[tuple[str, array]] = []
    total = 0
    for batch in _batched(docs, ENCODE_BATCH):
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
            if spec.max_tokens:
                ids = ids[: spec.max_tokens - total]
            kept.append((doc.key, array("i", ids + sep)))
            total += len(ids)
            if spec.max_tokens and total >= spec.max_tokens:
                break
        if spec.max_tokens and total >= spec.max_tokens:
            break
    if not kept:
        raise DataSourceError(f"{source} holds no documents with text")
    if len(kept) == 1:
        ids = kept[0][1]
        cut = len(ids) - max(1, round(len(ids) * spec.eval_fraction))
        train_parts, eval_parts = [ids[:cut]], [ids[cut:]]
    else:
        mask = [is_eval_file(key, spec.eval_fraction) for key, _ in kept]
        if all(mask) or not any(mask):
            pick = min if not any(mask) else max
            moved = pick(range(len(kept)), key=lambda i: split_score(kept[i][0]))
            mask[moved] = not mask[moved]
        train_parts = [ids for (_, ids), e in zip(kept, mask, strict=True) if not e]
        eval_parts = [ids for (_, ids), e in zip(kept, mask, strict=True) if e]
    dtype = token_dtype(tokenizer.vocab_size)
    train, eval_ = _concat(train_parts, dtype), _concat(eval_parts, dtype)
    if train.numel() == 0 or eval_.numel() == 0:
        raise DataSourceError(
            f"{source} has an empty split (train {train.numel()}, eval {eval_.numel()} tokens)"
        )
    return Corpus(train, eval_, _fingerprint(train, eval_, tokenizer), f"{source} tokenizer={tokenizer.name}")


def _concat(parts: list[array], dtype: torch.dtype) -> torch.Tensor:
    flat = array("i")
    for part in parts:
        flat.extend(part)
    return torch.frombuffer(flat, dtype=torch.int32).to(dtype) if flat else torch.empty(0, dtype=dtype)


def _fingerprint(train: torch.Tensor, eval_: torch.Tensor, tokenizer: Tokenizer) -> str:
    # Fixed-width little-endian int32 bytes: the same ids give the same hash whatever dtype stores them.
    data = fingerprint(
        train.to(torch.int32).numpy().astype("<i4").tobytes(),
        eval_.to(torch.int32).numpy().astype("<i4").tobytes(),
    )
    return hashlib.sha256(f"{tokenizer.fingerprint}:{data}".encode()).hexdigest()


def _builtin(spec: RunSpec, tokenizer: Tokenizer) -> Corpus:
    raw = load_stdlib_corpus(spec.corpus_max_bytes, spec.data.eval_fraction)
    if tokenizer.name == BYTES:
        return raw
    # Another tokenizer re-reads the same bytes as text: each split is one document per source file.
    splits = []
    for data in (raw.train, raw.eval):
        texts = bytes(data.numpy()).decode("utf-8", errors="replace").split(FILE_SEPARATOR.decode())
        ids = array("i")
        for part in tokenizer.encode_batch(texts):
            ids.extend(part + tokenizer.separator())
        splits.append(_concat([ids], token_dtype(tokenizer.vocab_size)))
    train, eval_ = splits
    return Corpus(
        train, eval_, _fingerprint(train, eval_, tokenizer), f"{raw.source} tokenizer={tokenizer.name}"
    )


def default_cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "antorcha" / "tokens"


def _cache_key(spec: RunSpec, tokenizer: Tokenizer) -> str:
    text = f"{spec.data.model_dump_json()}|{tokenizer.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_cache(path: Path) -> Corpus | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            corpus = Corpus(f.get_tensor("train"), f.get_tensor("eval"), meta["fingerprint"], meta["source"])
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        log.warning("ignoring unreadable token cache %s: %s", path, e)
        return None
    return corpus


def _write_cache(path: Path, corpus: Corpus) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    meta = {"fingerprint": corpus.fingerprint, "source": corpus.source}
    save_file({"train": corpus.train.contiguous(), "eval": corpus.eval.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


def shard_reader(spec: RunSpec, tokens: torch.Tensor, num_shards: int) -> ShardReader:
    """The reader every process of a run uses for its shards: same spec, same windows in each shard."""
    shuffled = spec.data.window_order == "shuffled"
    return ShardReader(tokens, num_shards, spec.seq_len, spec.batch_size, shuffled=shuffled, seed=spec.seed)


def load_run_data(spec: RunSpec, cache_dir: Path | None | str = "default") -> RunData:
    """The run's tokenizer and corpus. ``cache_dir`` keeps tokens of hf datasets (``"default"``: the
    ``ANTORCHA_DATA_CACHE_DIR`` variable or ~/.cache/antorcha/tokens; ``None``: no cache)."""
    tokenizer = load_tokenizer(spec.tokenizer)
    data = spec.data
    if data.source == "builtin":
        corpus = _builtin(spec, tokenizer)
    elif data.source == "hf":
        where = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        cached = where / f"{_cache_key(spec, tokenizer)}.safetensors" if where is not None else None
        corpus_or_none = _read_cache(cached) if cached is not None and cached.exists() else None
        if corpus_or_none is None:
            corpus_or_none = tokenize_corpus(documents(data), tokenizer, data, f"hf:{data.hf_name}")
            if cached is not None:
                _write_cache(cached, corpus_or_none)
        corpus = corpus_or_none
    else:
        corpus = tokenize_corpus(documents(data), tokenizer, data, f"{data.source}:{','.join(data.paths)}")
    log.info(
        "data source=%s tokenizer=%s vocab=%d train_tokens=%d eval_tokens=%d fingerprint=%s",
        data.source,
        tokenizer.name,
        tokenizer.vocab_size,
        corpus.train.numel(),
        corpus.eval.numel(),
        corpus.fingerprint[:12],
    )
    return RunData(corpus, tokenizer.vocab_size, tokenizer.name)
