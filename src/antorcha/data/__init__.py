"""Training data: offline byte-level corpora, per-worker shards, and evaluation batches."""

from antorcha.data.corpus import (
    BYTE_VOCAB_SIZE,
    Corpus,
    is_eval_file,
    load_stdlib_corpus,
    load_text_files,
)
from antorcha.data.sampling import (
    ShardReader,
    ShardSampler,
    eval_batches,
    evaluate,
    shard_bounds,
    shards_for_rounds,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "Corpus",
    "ShardReader",
    "ShardSampler",
    "eval_batches",
    "evaluate",
    "is_eval_file",
    "load_stdlib_corpus",
    "load_text_files",
    "shard_bounds",
    "shards_for_rounds",
]
