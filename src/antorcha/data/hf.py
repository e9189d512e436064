"""Documents from a Hugging Face ``datasets`` dataset (optional ``antorcha[hf]`` extra).

Owns opening the dataset the run names and reading its documents in the dataset's own order.

How every process gets the same tokens: the coordinator and each worker open the dataset themselves,
so the set of documents must be a pure function of the run spec. Nothing is shuffled here; a streamed
dataset is read from its first shard file onwards and cut after ``max_documents`` documents or
``max_tokens`` tokens (the run spec requires one of them for streaming), and ``hf_revision`` pins the
files when the dataset lives on the Hub. ``antorcha.data.source`` caches the resulting tokens on the
machine, keyed by the spec and the tokenizer, so a restarted worker reads the same tokens even if
the Hub changed meanwhile; the corpus fingerprint (logged by every process) tells when two machines
still ended up with different data. Local JSON/Parquet/text files work through the ``json``,
``parquet`` and ``text`` builders with ``paths`` as ``data_files``, fully offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from antorcha.config import DataSpec
from antorcha.data.files import DataSourceError, Document, expand_paths
from antorcha.data.tokenizers import HF_EXTRA_HINT

LOCAL_BUILDERS = frozenset({"json", "parquet", "text", "csv"})


def open_dataset(spec: DataSpec) -> Any:
    """The dataset split (an iterable of dict rows) that ``spec`` names."""
    try:
        import datasets
    except ImportError as e:
        raise DataSourceError(f"hf data sources need the datasets library; {HF_EXTRA_HINT}") from e
    data_files: list[str] | None = None
    if spec.paths:
        # Expanded (and checked) here so a typo reads "file not found", not a datasets traceback.
        data_files = [str(p) for p in expand_paths(spec.paths)]
    elif spec.hf_name in LOCAL_BUILDERS:
        raise DataSourceError(f"the {spec.hf_name!r} builder reads local files: set data.paths")
    try:
        return datasets.load_dataset(
            spec.hf_name,
            spec.hf_config or None,
            split=spec.hf_split,
            data_files=data_files,
            revision=spec.hf_revision or None,
            streaming=spec.hf_streaming,
        )
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataSourceError(f"cannot open hf dataset {spec.hf_name!r} split {spec.hf_split!r}: {e}") from e


def hf_documents(spec: DataSpec) -> Iterator[Document]:
    """The dataset's rows in order as documents; the row index is the key that decides the split."""
    dataset = open_dataset(spec)
    for index, row in enumerate(dataset):
        if spec.text_field not in row:
            columns = ", ".join(sorted(row)[:8])
            raise DataSourceError(
                f"hf dataset {spec.hf_name!r} row {index} has no column {spec.text_field!r} "
                f"(it has: {columns})"
            )
        text = row[spec.text_field]
        if text is not None and not isinstance(text, str):
            raise DataSourceError(
                f"hf dataset {spec.hf_name!r} row {index}: {spec.text_field!r} is {type(text).__name__}"
            )
        if text:
            yield Document(f"{spec.hf_name}:{spec.hf_config}:{spec.hf_split}:{index}", text)
