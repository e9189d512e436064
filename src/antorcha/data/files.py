"""Documents from a user's local files: plain text, JSON Lines and Parquet.

Owns expanding the configured paths (globs in sorted order, so every machine lists the same files in
the same order), reading each format into ``Document``s in a fixed order, and the errors a person can
act on: a missing file, a JSONL line that is not an object or lacks the text field, a Parquet file
without the text column. Each document carries a stable key (file name, plus line or row number) that
decides its train/eval split without depending on the other documents.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from antorcha.data.tokenizers import HF_EXTRA_HINT


class DataSourceError(ValueError):
    """The configured data cannot be read; the message names the file (and line or row)."""


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: decides the document's split (see antorcha.data.corpus.is_eval_file)
    text: str


def expand_paths(patterns: list[str]) -> list[Path]:
    """Each pattern's files in sorted order (a glob) or itself (a plain path), missing ones refused."""
    if not patterns:
        raise DataSourceError("no data paths given")
    found: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if glob.has_magic(expanded):
            # sorted(): glob's order follows the directory listing, which differs across file systems.
            matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataSourceError(f"no file matches {pattern!r}")
            found.extend(matches)
        else:
            path = Path(expanded)
            if not path.is_file():
                raise DataSourceError(f"data file not found: {pattern}")
            found.append(path)
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise DataSourceError(f"cannot read {path}: {e}") from e


def text_documents(paths: list[Path]) -> Iterator[Document]:
    """One document per file; the file name is its key (as in ``load_text_files``)."""
    for path in paths:
        yield Document(path.name, _read_text(path))


def jsonl_documents(paths: list[Path], text_field: str) -> Iterator[Document]:
    """One document per non-blank line: the string at ``text_field`` of a JSON object."""
    for path in paths:
        with path.open("r", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataSourceError(f"{where} is not valid JSON: {e}") from e
                if not isinstance(record, dict):
                    raise DataSourceError(f"{where} is a JSON {type(record).__name__}, not an object")
                if text_field not in record:
                    keys = ", ".join(sorted(record)[:8])
                    raise DataSourceError(f"{where} has no field {text_field!r} (it has: {keys})")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataSourceError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
                yield Document(f"{path.name}:{number}", text)


def parquet_documents(paths: list[Path], text_field: str) -> Iterator[Document]:
    """One document per row of the ``text_field`` column, read in row-group batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataSourceError(f"reading Parquet needs pyarrow; {HF_EXTRA_HINT}") from e
    for path in paths:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
            raise DataSourceError(f"{path} is not a readable Parquet file: {e}") from e
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise DataSourceError(f"{path} has no column {text_field!r} (it has: {', '.join(columns[:8])})")
        row = 0
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataSourceError(
                        f"{path} row {row}: column {text_field!r} holds {type(text).__name__}, not text"
                    )
                if text:  # null and empty rows carry nothing to learn
                    yield Document(f"{path.name}:{row}", text)
                row += 1


def file_documents(kind: str, patterns: list[str], text_field: str) -> Iterator[Document]:
    """Documents of a local-file source (``text``, ``jsonl`` or ``parquet``), in a fixed order."""
    paths = expand_paths(patterns)
    if kind == "text":
        return text_documents(paths)
    if kind == "jsonl":
        return jsonl_documents(paths, text_field)
    if kind == "parquet":
        return parquet_documents(paths, text_field)
    raise DataSourceError(f"unknown file source {kind!r}; expected text, jsonl or parquet")
