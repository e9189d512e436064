"""A worker's progress display: one line on a terminal that rewrites itself, or a log line every few
seconds when stderr is a file or a pipe (systemd, Docker, the demo's log files).

Log records and the progress line share stderr. On a terminal the line is erased before a log record
is written and drawn again after it, so the two never garble each other.
"""

from __future__ import annotations

import io
import logging
import shutil
import threading
import time
from typing import TextIO

log = logging.getLogger(__name__)

_CLEAR = "\r\033[K"


class _SharedStream(io.TextIOBase):
    """What logging handlers write to instead of the terminal: erase the progress line, write the log
    record, draw the line again."""

    def __init__(self, display: ProgressLine) -> None:
        self.display = display

    def write(self, text: str) -> int:
        with self.display.lock:
            out = self.display.stream
            if self.display.shown:
                out.write(_CLEAR)
            out.write(text)
            if self.display.shown and text.endswith("\n"):
                out.write(self.display.shown)
            out.flush()
        return len(text)

    def flush(self) -> None:
        self.display.stream.flush()


class ProgressLine:
    """One rewriting line on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.shown = ""
        for handler in logging.getLogger().handlers:  # the root handlers that write to this terminal
            if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
                handler.setStream(_SharedStream(self))  # type: ignore[arg-type]

    def show(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        with self.lock:
            self.shown = text[:width]
            self.stream.write(_CLEAR + self.shown)
            self.stream.flush()

    def close(self) -> None:
        with self.lock:
            if self.shown:
                self.stream.write(_CLEAR)
                self.stream.flush()
            self.shown = ""


class ProgressLog:
    """A log line at most every `interval_s` seconds."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self._last_text = ""

    def show(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s and text != self._last_text:
            self._last, self._last_text = now, text
            log.info("progress %s", text)

    def close(self) -> None:
        pass


def human(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)
