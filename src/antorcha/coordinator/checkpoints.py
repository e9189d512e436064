"""Checkpoints of the global state on disk: written atomically after every round, the last K kept,
verified on load with fallback to an older one.

A checkpoint of round r is two files in one directory:

* ``round-{r:08d}.safetensors``: the encoded state (`antorcha.diloco.state.encode_state`);
* ``round-{r:08d}.json``: its manifest (round, sha256 and size of the data file, parameter checksum,
  creation time, format version).

Both are written to a temp file in the same directory, fsynced, renamed into place, and the directory
is fsynced. The data file goes first and the manifest last, so a manifest only ever describes a
complete data file; a crash in between leaves a data file without a manifest, which is never loaded.
Loading goes newest first and checks size and sha256 against the manifest before decoding, so a
torn, truncated or bit-flipped file is rejected (with a WARNING naming the file and the reason) and
the next older checkpoint is tried.

One process writes a directory at a time: stray temp files found on construction are left over from
a crash and are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from antorcha.diloco.state import sha256_hex

log = logging.getLogger(__name__)

T = TypeVar("T")

FORMAT = 1
DATA_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"
SUPERSEDED_DIR = "superseded"
_NAME = re.compile(r"^round-(\d{8,})\.(safetensors|json)$")
# Temp names start with a dot so that globs for "round-*" never see a half-written file.
_TMP_PREFIX = ".round-"
_TMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, unwritable directory, I/O error).

    An `OSError` subclass carrying the errno of the failure that caused it, so callers that already
    handle I/O errors keep working; the message names the file that failed. When it is raised no
    new checkpoint files and no temp files are left, and older checkpoints are untouched.
    """


@dataclass(frozen=True)
class CheckpointInfo:
    round: int
    path: Path  # the data file
    sha256: str  # of the data file's bytes
    checksum: str  # of the parameters (`GlobalState.checksum`)
    size_bytes: int
    created_at: float  # unix time


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stray_temp_files()

    # ---- paths -------------------------------------------------------------------------------

    def data_path(self, round_: int) -> Path:
        return self.directory / f"round-{round_:08d}{DATA_SUFFIX}"

    def manifest_path(self, round_: int) -> Path:
        return self.directory / f"round-{round_:08d}{MANIFEST_SUFFIX}"

    # ---- writing -----------------------------------------------------------------------------

    def save(self, round_: int, data: bytes, checksum: str) -> CheckpointInfo:
        """Write the checkpoint of `round_` durably, replacing one of the same round, then prune.

        Raises CheckpointWriteError when it could not be written; then nothing of this round is left
        on disk (a same-round checkpoint survives a failure to write the new bytes, but not a failure
        of the final renames, which happen after it was unlinked) and older checkpoints are intact.
        """
        if round_ < 0:
            raise ValueError(f"round must be >= 0, got {round_}")
        data_path, manifest_path = self.data_path(round_), self.manifest_path(round_)
        info = CheckpointInfo(
            round=round_,
            path=data_path,
            sha256=sha256_hex(data),
            checksum=checksum,
            size_bytes=len(data),
            created_at=time.time(),
        )
        manifest = {
            "round": info.round,
            "sha256": info.sha256,
            "checksum": info.checksum,
            "size_bytes": info.size_bytes,
            "created_at": info.created_at,
            "format": FORMAT,
        }
        manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()

        # Everything that can run out of space happens in temp files, before any final name is
        # touched: a full disk then costs nothing but this round's checkpoint.
        temps: list[Path] = []
        failed_path = data_path
        try:
            temps.append(self._write_temp(data_path, data))
            failed_path = manifest_path
            temps.append(self._write_temp(manifest_path, manifest_bytes))
        except OSError as e:
            self._discard(temps)
            raise _write_error(failed_path, e) from e
        except BaseException:
            self._discard(temps)
            raise

        tmp_data, tmp_manifest = temps
        renamed: list[Path] = []
        try:
            # The old manifest of this round goes first so it never describes the new data file.
            failed_path = manifest_path
            manifest_path.unlink(missing_ok=True)
            failed_path = data_path
            os.replace(tmp_data, data_path)
            renamed.append(data_path)
            self._fsync_directory()
            failed_path = manifest_path
            os.replace(tmp_manifest, manifest_path)
            renamed.insert(0, manifest_path)  # on rollback the manifest must go before its data
            self._fsync_directory()
        except OSError as e:
            self._discard([tmp_data, tmp_manifest, *renamed])
            raise _write_error(failed_path, e) from e
        except BaseException:
            self._discard([tmp_data, tmp_manifest, *renamed])
            raise

        log.info(
            "checkpoint saved round=%d path=%s size_bytes=%d sha256=%s checksum=%s",
            round_,
            data_path,
            info.size_bytes,
            info.sha256,
            checksum,
        )
        try:
            self._prune(round_)
        except OSError as e:  # the new checkpoint is durable; pruning is retried after the next save
            log.warning("checkpoint prune failed directory=%s reason=%s", self.directory, e)
        return info

    def _write_temp(self, final: Path, payload: bytes) -> Path:
        tmp = self.directory / f".{final.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        # os.open rather than mkstemp: mkstemp forces mode 0600, this honours the umask.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _discard(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # the disk is failing already; say what is left behind
                log.error("checkpoint cleanup failed path=%s reason=%s", path, e)

    def _prune(self, saved_round: int) -> None:
        """Keep `saved_round` and the newest `keep - 1` valid checkpoints before it.

        Checkpoints newer than the one just saved belong to a timeline the run abandoned (it fell back
        to an older checkpoint): they are moved to `superseded/` rather than deleted, so a fallback
        caused by a transient fault or a bug never destroys the newer state. Everything else that is
        not kept (older checkpoints, unreadable manifests, data files without a manifest) is deleted.
        """
        older = [info.round for info in self.list() if info.round < saved_round]
        kept = {saved_round, *older[: self.keep - 1]}
        for path in sorted(self.directory.iterdir()):
            match = _NAME.match(path.name)
            if match is None or int(match.group(1)) in kept:
                continue
            round_ = int(match.group(1))
            try:
                if round_ > saved_round:
                    target = self.directory / SUPERSEDED_DIR / path.name
                    target.parent.mkdir(exist_ok=True)
                    os.replace(path, target)
                    log.warning(
                        "checkpoint superseded path=%s moved_to=%s saved_round=%d", path, target, saved_round
                    )
                else:
                    path.unlink(missing_ok=True)
                    log.debug("checkpoint pruned path=%s", path)
            except OSError as e:  # the new checkpoint is safe; a leftover old file only costs space
                log.warning("checkpoint prune failed path=%s reason=%s", path, e)

    def _remove_stray_temp_files(self) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith(_TMP_PREFIX) and path.name.endswith(_TMP_SUFFIX):
                try:
                    path.unlink()
                    log.info("removed stray checkpoint temp file path=%s", path)
                except OSError as e:
                    log.warning("stray checkpoint temp file not removed path=%s reason=%s", path, e)

    # ---- reading -----------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """The checkpoints with a readable manifest, newest first (their data is not checked here)."""
        infos = []
        for path in self.directory.glob(f"round-*{MANIFEST_SUFFIX}"):
            match = _NAME.match(path.name)
            if match is None:
                continue
            try:
                infos.append(self._read_manifest(path, int(match.group(1))))
            except (OSError, ValueError) as e:
                log.warning("checkpoint manifest skipped path=%s reason=%s", path, e)
        infos.sort(key=lambda info: info.round, reverse=True)
        return infos

    def latest_round(self) -> int | None:
        """The round of the newest checkpoint with a readable manifest, without reading its data."""
        infos = self.list()
        return infos[0].round if infos else None

    def load_latest(self, decode: Callable[[bytes], T]) -> tuple[CheckpointInfo, T] | None:
        """The newest checkpoint whose bytes match its manifest and that `decode` accepts.

        Checkpoints that fail are logged at WARNING with the reason and skipped; any exception from
        `decode` counts as a failure, since its only job here is to judge whether the bytes are usable.
        """
        infos = self.list()
        if not infos:
            log.info("no checkpoint found directory=%s", self.directory)
            return None
        for info in infos:
            data, reason = self._read_verified(info)
            if data is not None:
                try:
                    value = decode(data)
                except Exception as e:
                    reason = f"decode failed: {type(e).__name__}: {e}"
                else:
                    log.info("checkpoint loaded round=%d path=%s", info.round, info.path)
                    return info, value
            log.warning("checkpoint rejected path=%s round=%d reason=%s", info.path, info.round, reason)
        log.error("no valid checkpoint directory=%s tried=%d", self.directory, len(infos))
        return None

    def _read_verified(self, info: CheckpointInfo) -> tuple[bytes | None, str]:
        """The data file's bytes if they match the manifest, else None and why not."""
        try:
            data = info.path.read_bytes()
        except FileNotFoundError:
            return None, "data file missing"
        except OSError as e:
            return None, f"unreadable: {e}"
        if len(data) < info.size_bytes:
            return None, f"truncated: {len(data)} of {info.size_bytes} bytes"
        if len(data) != info.size_bytes:
            return None, f"size mismatch: {len(data)} bytes, manifest says {info.size_bytes}"
        actual = sha256_hex(data)
        if actual != info.sha256:
            return None, f"sha256 mismatch: file {actual}, manifest {info.sha256}"
        return data, ""

    def _read_manifest(self, path: Path, round_: int) -> CheckpointInfo:
        raw: Any = json.loads(path.read_bytes())
        if not isinstance(raw, dict):
            raise ValueError("manifest is not a JSON object")
        if raw.get("format") != FORMAT:
            raise ValueError(f"unsupported format {raw.get('format')!r}")
        fields = {
            "round": int,
            "sha256": str,
            "checksum": str,
            "size_bytes": int,
            "created_at": (int, float),
        }
        for name, kind in fields.items():
            value = raw.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"manifest field {name!r} is missing or invalid: {value!r}")
        if raw["round"] != round_:
            raise ValueError(f"manifest says round {raw['round']}, file name says {round_}")
        if raw["size_bytes"] < 0 or not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
            raise ValueError("manifest size or sha256 is malformed")
        if not math.isfinite(raw["created_at"]):
            raise ValueError("manifest created_at is not finite")
        return CheckpointInfo(
            round=round_,
            path=self.data_path(round_),
            sha256=raw["sha256"],
            checksum=raw["checksum"],
            size_bytes=raw["size_bytes"],
            created_at=float(raw["created_at"]),
        )


def _write_error(path: Path, cause: OSError) -> CheckpointWriteError:
    reason = cause.strerror or str(cause) or type(cause).__name__
    message = f"checkpoint write failed path={path} reason={reason}"
    if cause.errno is None:
        return CheckpointWriteError(message)
    return CheckpointWriteError(cause.errno, message)
