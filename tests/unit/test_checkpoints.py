"""Checkpoint files of the global state: atomic writes, keeping the last K, and falling back to an
older checkpoint when the newest is corrupt, truncated, missing or not this run's.

Every failure to write must leave the directory as it was (no temp files, no half checkpoint), and
every rejected checkpoint must be named in a WARNING with the reason.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from antorcha.coordinator.checkpoints import CheckpointInfo, CheckpointStore, CheckpointWriteError
from antorcha.diloco.params import ParamLayout
from antorcha.diloco.state import CorruptStateError, GlobalState, decode_state, encode_state, sha256_hex
from antorcha.model import build_model

RUN = "run-test"
LOGGER = "antorcha.coordinator.checkpoints"


@pytest.fixture(scope="module")
def layout() -> ParamLayout:
    return ParamLayout.of(build_model("nano", 256, 64, seed=7))


@pytest.fixture(scope="module")
def states(layout: ParamLayout) -> dict[int, GlobalState]:
    """Distinct states for rounds 0..5, so a fallback is visible in the loaded values."""
    out = {}
    for r in range(6):
        g = torch.Generator().manual_seed(100 + r)
        out[r] = GlobalState(
            round=r,
            params=torch.randn(layout.total, generator=g),
            momentum=torch.randn(layout.total, generator=g),
        )
    return out


@pytest.fixture(scope="module")
def encoded(layout: ParamLayout, states: dict[int, GlobalState]) -> dict[int, bytes]:
    return {r: encode_state(layout, s, RUN) for r, s in states.items()}


@pytest.fixture
def decode(layout: ParamLayout) -> Callable[[bytes], GlobalState]:
    return lambda b: decode_state(layout, b, RUN)


def _save(store: CheckpointStore, states: dict[int, GlobalState], encoded: dict[int, bytes], *rounds: int):
    return [store.save(r, encoded[r], states[r].checksum) for r in rounds]


def _loaded_round(store: CheckpointStore, decode: Callable[[bytes], GlobalState]) -> int:
    loaded = store.load_latest(decode)
    assert loaded is not None
    info, state = loaded
    assert info.round == state.round
    return state.round


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file()}


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def _rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "checkpoint rejected" in r.getMessage()
    ]


# ---- round trip, listing, pruning ------------------------------------------------------------


def test_save_then_load_round_trips_params_and_momentum(tmp_path, states, encoded, decode):
    store = CheckpointStore(tmp_path / "ckpt")
    info = store.save(3, encoded[3], states[3].checksum)

    assert info.round == 3
    assert info.path == tmp_path / "ckpt" / "round-00000003.safetensors"
    assert info.path.read_bytes() == encoded[3]
    assert info.size_bytes == len(encoded[3])
    assert info.sha256 == sha256_hex(encoded[3])
    assert info.checksum == states[3].checksum
    manifest = json.loads((tmp_path / "ckpt" / "round-00000003.json").read_text())
    assert manifest == {
        "round": 3,
        "sha256": info.sha256,
        "checksum": info.checksum,
        "size_bytes": info.size_bytes,
        "created_at": info.created_at,
        "format": 1,
    }

    loaded = CheckpointStore(tmp_path / "ckpt").load_latest(decode)  # a fresh store, as after a restart
    assert loaded is not None
    loaded_info, state = loaded
    assert loaded_info == info
    assert state.round == 3
    assert torch.equal(state.params, states[3].params)
    assert torch.equal(state.momentum, states[3].momentum)


def test_empty_store(tmp_path, decode, caplog):
    store = CheckpointStore(tmp_path / "a" / "b")  # creates missing parents
    assert (tmp_path / "a" / "b").is_dir()
    assert store.list() == []
    assert store.latest_round() is None
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert store.load_latest(decode) is None
    assert "no checkpoint found" in caplog.text


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


def test_list_is_newest_first_and_latest_round(tmp_path, states, encoded):
    store = CheckpointStore(tmp_path, keep=5)
    _save(store, states, encoded, 0, 1, 2, 4)
    infos = store.list()
    assert [i.round for i in infos] == [4, 2, 1, 0]
    assert all(isinstance(i, CheckpointInfo) for i in infos)
    assert store.latest_round() == 4


def test_keep_prunes_older_checkpoints(tmp_path, states, encoded, decode):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, states, encoded, 0, 1, 2, 3)
    assert [i.round for i in store.list()] == [3, 2]
    assert _names(tmp_path) == {
        "round-00000002.safetensors",
        "round-00000002.json",
        "round-00000003.safetensors",
        "round-00000003.json",
    }
    assert _loaded_round(store, decode) == 3


def test_saving_the_same_round_again_replaces_it(tmp_path, states, encoded, decode):
    store = CheckpointStore(tmp_path)
    store.save(1, encoded[0], states[0].checksum)
    info = store.save(1, encoded[1], states[1].checksum)
    assert [i.round for i in store.list()] == [1]
    assert store.list()[0] == info
    loaded = store.load_latest(decode)
    assert loaded is not None
    assert torch.equal(loaded[1].params, states[1].params)


def test_pruning_removes_data_files_without_manifest(tmp_path, states, encoded):
    store = CheckpointStore(tmp_path, keep=2)
    (tmp_path / "round-00000000.safetensors").write_bytes(encoded[0])  # crash between data and manifest
    _save(store, states, encoded, 1, 2)
    assert "round-00000000.safetensors" not in _names(tmp_path)


def test_saving_an_older_round_supersedes_newer_ones(tmp_path, states, encoded, decode, caplog):
    """After a fallback the run redoes rounds; checkpoints of the abandoned timeline are moved aside."""
    store = CheckpointStore(tmp_path, keep=5)
    _save(store, states, encoded, 1, 2, 3, 4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store.save(2, encoded[2], states[2].checksum)
    assert [i.round for i in store.list()] == [2, 1]
    assert _loaded_round(store, decode) == 2
    superseded = tmp_path / "superseded"
    assert {p.name for p in superseded.iterdir()} == {
        "round-00000003.json",
        "round-00000003.safetensors",
        "round-00000004.json",
        "round-00000004.safetensors",
    }
    assert "checkpoint superseded" in caplog.text


# ---- fallback on load ------------------------------------------------------------------------


def test_flipped_byte_falls_back_to_previous_checkpoint(tmp_path, states, encoded, decode, caplog):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 1, 2)
    newest = store.data_path(2)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _loaded_round(store, decode) == 1
    [message] = _rejections(caplog)
    assert f"path={newest}" in message
    assert "reason=sha256 mismatch" in message


def test_truncated_file_falls_back_and_says_truncated(tmp_path, states, encoded, decode, caplog):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 1, 2)
    newest = store.data_path(2)
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.truncate(1234)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _loaded_round(store, decode) == 1
    [message] = _rejections(caplog)
    assert f"reason=truncated: 1234 of {size} bytes" in message


def test_missing_data_file_falls_back(tmp_path, states, encoded, decode, caplog):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 1, 2)
    store.data_path(2).unlink()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _loaded_round(store, decode) == 1
    [message] = _rejections(caplog)
    assert "reason=data file missing" in message


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{not json", b"[1, 2]", b'{"round": 2, "format": 1}', b"\xff\xfe\x00"],
    ids=["empty", "not-json", "not-object", "missing-fields", "not-utf8"],
)
def test_garbage_manifest_is_skipped(tmp_path, states, encoded, decode, caplog, garbage):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 1, 2)
    store.manifest_path(2).write_bytes(garbage)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert [i.round for i in store.list()] == [1]
        assert store.latest_round() == 1
        assert _loaded_round(store, decode) == 1
    assert "checkpoint manifest skipped" in caplog.text
    assert str(store.manifest_path(2)) in caplog.text


def test_manifest_of_another_round_is_skipped(tmp_path, states, encoded):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 1)
    os.replace(store.manifest_path(1), store.manifest_path(7))
    assert store.list() == []


def test_decode_error_falls_back(tmp_path, layout, states, encoded, caplog):
    store = CheckpointStore(tmp_path)
    store.save(1, encoded[1], states[1].checksum)
    foreign = encode_state(layout, states[2], "another-run")  # intact bytes, wrong run
    store.save(2, foreign, states[2].checksum)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _loaded_round(store, lambda b: decode_state(layout, b, RUN)) == 1
    [message] = _rejections(caplog)
    assert "reason=decode failed: CorruptStateError" in message
    assert "another-run" in message


def test_any_decode_exception_falls_back(tmp_path, states, encoded, caplog):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 1, 2)

    def decode(data: bytes) -> bytes:
        if data == encoded[2]:
            raise OSError(errno.EIO, "simulated")
        return data

    loaded = store.load_latest(decode)
    assert loaded is not None and loaded[0].round == 1


def test_all_corrupt_gives_none(tmp_path, states, encoded, decode, caplog):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 0, 1, 2)
    for r in (0, 1, 2):
        store.data_path(r).write_bytes(b"\x00" * 16)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_latest(decode) is None
    assert len(_rejections(caplog)) == 3
    assert "no valid checkpoint" in caplog.text


def test_all_rejected_by_decode_gives_none(tmp_path, states, encoded):
    store = CheckpointStore(tmp_path)
    _save(store, states, encoded, 0, 1)

    def decode(_: bytes) -> None:
        raise CorruptStateError("nope")

    assert store.load_latest(decode) is None


# ---- write failures and crashes --------------------------------------------------------------


def _fail_nth_fsync(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real = os.fsync
    calls = 0

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# fsync calls during a save: data temp file, manifest temp file, directory after the data rename,
# directory after the manifest rename. A failure at any of them must leave the directory as before.
@pytest.mark.parametrize("failing_fsync", [1, 2, 3, 4])
def test_disk_full_leaves_previous_checkpoints_and_no_debris(
    tmp_path, states, encoded, decode, monkeypatch, failing_fsync
):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, states, encoded, 1, 2)
    before = _names(tmp_path)

    _fail_nth_fsync(monkeypatch, failing_fsync)
    with pytest.raises(CheckpointWriteError) as excinfo:
        store.save(3, encoded[3], states[3].checksum)
    monkeypatch.undo()

    assert isinstance(excinfo.value, OSError)
    assert excinfo.value.errno == errno.ENOSPC
    assert "round-00000003" in str(excinfo.value)
    assert "No space left on device" in str(excinfo.value)
    assert _names(tmp_path) == before
    assert _temp_files(tmp_path) == []
    assert _loaded_round(store, decode) == 2
    assert store.latest_round() == 2


@pytest.mark.parametrize("failing_fsync", [1, 2])
def test_failed_rewrite_of_a_round_keeps_the_old_one(
    tmp_path, states, encoded, decode, monkeypatch, failing_fsync
):
    store = CheckpointStore(tmp_path)
    store.save(2, encoded[2], states[2].checksum)
    _fail_nth_fsync(monkeypatch, failing_fsync)
    with pytest.raises(CheckpointWriteError):
        store.save(2, encoded[3], states[3].checksum)
    monkeypatch.undo()
    loaded = store.load_latest(decode)
    assert loaded is not None
    assert torch.equal(loaded[1].params, states[2].params)


def test_failed_rename_leaves_no_debris(tmp_path, states, encoded, decode, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(1, encoded[1], states[1].checksum)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):  # the data file is already in place when this fails
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointWriteError, match=r"round-00000002\.json"):
        store.save(2, encoded[2], states[2].checksum)
    monkeypatch.undo()
    assert _names(tmp_path) == {"round-00000001.safetensors", "round-00000001.json"}
    assert _loaded_round(store, decode) == 1


def test_unwritable_directory(tmp_path, states, encoded, decode, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(1, encoded[1], states[1].checksum)
    real = os.open

    def deny_create(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny_create)
    with pytest.raises(CheckpointWriteError, match="Permission denied") as excinfo:
        store.save(2, encoded[2], states[2].checksum)
    monkeypatch.undo()
    assert excinfo.value.errno == errno.EACCES
    assert _temp_files(tmp_path) == []
    assert _loaded_round(store, decode) == 1


def test_stray_temp_files_are_removed_on_construction(tmp_path, states, encoded, decode):
    store = CheckpointStore(tmp_path)
    store.save(1, encoded[1], states[1].checksum)
    stray = tmp_path / ".round-00000002.safetensors.0123456789ab.tmp"
    stray.write_bytes(encoded[2][:100])  # a crash in the middle of writing round 2
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("not ours")

    store = CheckpointStore(tmp_path)
    assert not stray.exists()
    assert unrelated.exists()
    assert store.latest_round() == 1
    assert _loaded_round(store, decode) == 1


def test_temp_files_are_invisible_to_round_globs(tmp_path, states, encoded, monkeypatch):
    """Tools (and tests) glob `round-*.safetensors`; a half-written file must never match."""
    seen: list[list[str]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(sorted(p.name for p in tmp_path.glob("round-*")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    CheckpointStore(tmp_path).save(1, encoded[1], states[1].checksum)
    assert seen[0] == []  # while the data temp file is written, nothing matches yet
