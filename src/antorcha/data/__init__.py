"""Training data: offline byte-level corpora, per-worker shards, and evaluation batches."""

from antorcha.data.corpus import (
    BYTE_VOCAB_SIZE,
    Corpus,
    is_eval_file,
    load_stdlib_corpus,
    load_text_files,
)
from antorcha.data.sampling import ShardSampler, eval_batches, evaluate, shard_bounds

__all__ = [
    "BYTE_VOCAB_SIZE",
    "Corpus",
    "ShardSampler",
    "eval_batches",
    "evaluate",
    "is_eval_file",
    "load_stdlib_corpus",
    "load_text_files",
    "shard_bounds",
]
