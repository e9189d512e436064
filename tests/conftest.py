"""Shared test set-up: tests import the package from src/ and never touch the network beyond loopback."""

from __future__ import annotations

import os

# Keep torch from oversubscribing the 2-core CI machine when several processes run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
