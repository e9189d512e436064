"""Shared test set-up: tests import the package from src/ and never touch the network beyond loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch from oversubscribing the 2-core CI machine when several processes run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hugging Face libraries may not reach the Hub, and keep their caches in the test's folder. Set in
    the environment, so coordinator and worker processes a test starts inherit it too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("ANTORCHA_DATA_CACHE_DIR", str(tmp_path / "token-cache"))
