"""Offline byte-level text corpora with a file-level train/eval split.

Owns where training text comes from (the Python standard library's own sources, or a user's local
files), how it is split so that no eval file is ever seen in training, and the corpus fingerprint
that lets workers check they all hold the same data. Nothing is downloaded or cached on disk.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BYTE_VOCAB_SIZE = 256
FILE_SEPARATOR = b"\n\n"
# Third-party code, test suites (huge and repetitive) and the two packages that are mostly data
# tables or deprecated would skew the text away from ordinary library code.
SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor
    eval: torch.Tensor
    fingerprint: str
    source: str


def split_score(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a file name."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_eval_file(name: str, eval_fraction: float) -> bool:
    """Whether the file called ``name`` belongs to the eval split.

    A hash rather than a random draw: the answer depends on the name alone, so it is the same on
    every machine and run, and adding or removing other files never moves this one.
    """
    return split_score(name) < eval_fraction


def fingerprint(train: bytes, eval_: bytes) -> str:
    """sha256 over both splits, length-prefixed so moving bytes across the split changes it."""
    h = hashlib.sha256()
    for tag, data in ((b"train", train), (b"eval", eval_)):
        h.update(tag + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _to_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    # bytearray: frombuffer on immutable bytes warns, and the tensor must own writable memory.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")


def _make_corpus(train_parts: list[bytes], eval_parts: list[bytes], source: str) -> Corpus:
    train = FILE_SEPARATOR.join(train_parts)
    eval_ = FILE_SEPARATOR.join(eval_parts)
    if not train or not eval_:
        sizes = f"train {len(train)}, eval {len(eval_)} bytes"
        raise ValueError(f"corpus from {source} has an empty split ({sizes})")
    return Corpus(_to_tensor(train), _to_tensor(eval_), fingerprint(train, eval_), source)


def stdlib_source_files(stdlib_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every kept ``.py`` file, in sorted relative-path order."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(stdlib_dir):
        # Pruning in place stops os.walk descending into skipped trees at all.
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_STDLIB_DIRS]
        base = Path(dirpath)
        for filename in filenames:
            if filename.endswith(".py"):
                path = base / filename
                found.append((path.relative_to(stdlib_dir).as_posix(), path))
    found.sort()
    return found


def load_stdlib_corpus(max_bytes: int = 8_000_000, eval_fraction: float = 0.02) -> Corpus:
    """The standard library's own Python sources as bytes, at most ``max_bytes`` over both splits.

    Deterministic for a given Python installation; the fingerprint tells installations apart.
    """
    _check_fraction(eval_fraction)
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    # Each split has its own budget and draws from the whole library, so a small corpus still gets
    # held-out files (they are only ~2% of files and could all lie past a single shared cut).
    eval_budget = max(int(eval_fraction * max_bytes), min(64_000, max_bytes // 4))
    budgets = {False: max_bytes - eval_budget, True: eval_budget}
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    used = {False: 0, True: 0}
    for rel_path, path in stdlib_source_files(stdlib_dir):
        if all(used[k] >= budgets[k] for k in used):
            break
        is_eval = is_eval_file(rel_path, eval_fraction)
        room = budgets[is_eval] - used[is_eval]
        if room <= 0:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        # A separator precedes every file but the first of its split.
        cost = len(data) + (len(FILE_SEPARATOR) if parts[is_eval] else 0)
        if cost > room:
            data = data[: max(0, len(data) - (cost - room))]
            cost = room
        if data:
            parts[is_eval].append(data)
            used[is_eval] += cost
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return _make_corpus(parts[False], parts[True], f"python{version}-stdlib:{stdlib_dir}")


def load_text_files(paths: list[Path], eval_fraction: float = 0.02) -> Corpus:
    """Local text files, read as raw bytes in the given order, split by file name.

    With one file, its last ``eval_fraction`` of bytes is the eval split. With several, a split the
    hash leaves empty takes the one file whose hash lies closest to the threshold, so both splits
    always hold whole files.
    """
    _check_fraction(eval_fraction)
    if not paths:
        raise ValueError("load_text_files needs at least one path")
    contents = [Path(p).read_bytes() for p in paths]
    source = "files:" + ",".join(str(p) for p in paths)
    if len(paths) == 1:
        data = contents[0]
        cut = len(data) - max(1, round(len(data) * eval_fraction))
        return _make_corpus([data[:cut]], [data[cut:]], source)
    names = [Path(p).name for p in paths]
    eval_mask = [is_eval_file(name, eval_fraction) for name in names]
    if not any(eval_mask) or all(eval_mask):
        pick = min if not any(eval_mask) else max
        moved = pick(range(len(paths)), key=lambda i: split_score(names[i]))
        eval_mask[moved] = not eval_mask[moved]
    train_parts = [c for c, e in zip(contents, eval_mask, strict=True) if not e]
    eval_parts = [c for c, e in zip(contents, eval_mask, strict=True) if e]
    return _make_corpus(train_parts, eval_parts, source)
