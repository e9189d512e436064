"""Logging set-up shared by every antorcha process: one line per event, key=value context."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(role: str, level: str | None = None) -> None:
    level_name = (level or os.environ.get("ANTORCHA_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s role={role} pid=%(process)d %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    # hivemind installs its own handlers and is chatty at INFO; keep its warnings, route them through ours.
    for noisy in ("hivemind",):
        lg = logging.getLogger(noisy)
        lg.handlers[:] = []
        lg.propagate = True
        lg.setLevel(max(logging.WARNING, root.level))
