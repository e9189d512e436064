"""Starting the delay proxy as a child process (``spawn_proxy``) and following its stdout reports
(``ProxyProcess``): the lab runs proxies this way, behind ``nsenter``, inside its hub namespace.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from antorcha.netem.proxy import ConnectionRecord, ProxyStats


class ProxyProcess:
    """A proxy running as a child process; ``stats`` follows its stdout reports."""

    def __init__(self, proc: subprocess.Popen[str], ready_timeout_s: float) -> None:
        self.proc = proc
        self.stats = ProxyStats()
        self.records: list[ConnectionRecord] = []
        self.address: tuple[str, int] = ("", 0)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._listening = threading.Event()
        threading.Thread(target=self._follow_stdout, daemon=True).start()
        stderr_reader = threading.Thread(target=self._follow_stderr, daemon=True)
        stderr_reader.start()
        if not self._listening.wait(ready_timeout_s) or not self.address[1]:
            self.stop()
            stderr_reader.join(5.0)  # the whole of its last words, not a race with the reader
            raise RuntimeError(f"delay proxy did not start: {self.stderr_tail() or 'no output'}")

    def _follow_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._apply(json.loads(line))
        self._listening.set()  # wake a waiting constructor if the process died first

    def _follow_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())

    def _apply(self, msg: dict[str, object]) -> None:
        event = msg.pop("event", None)
        with self._changed:
            if event == "listening":
                self.address = (str(msg["host"]), int(msg["port"]))  # type: ignore[call-overload]
                self._listening.set()
            elif event == "opened":
                self.stats.opened += 1
            elif event == "closed":
                record = ConnectionRecord(**msg)  # type: ignore[arg-type]
                self.records.append(record)
                self.stats.closed += 1
                self.stats.bytes_up += record.bytes_up
                self.stats.bytes_down += record.bytes_down
                self.stats.resets += record.outcome == "reset"
                self.stats.failed += record.outcome == "failed"
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[ProxyStats], bool], timeout_s: float) -> ProxyStats:
        """Block until ``predicate(stats)`` holds (e.g. all connections reported closed)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.stats), timeout_s):
                raise TimeoutError(f"proxy stats never matched within {timeout_s} s: {self.stats}")
            return replace(self.stats)

    def snapshot(self) -> ProxyStats:
        """A consistent copy of the totals reported so far."""
        with self._changed:
            return replace(self.stats)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn_proxy(
    target: tuple[str, int],
    *,
    listen: tuple[str, int] | None = None,
    listen_sock: socket.socket | None = None,
    delay_ms: float = 0.0,
    delay_ms_by_source: Mapping[str, float] | None = None,
    prefix: Sequence[str] = (),
    ready_timeout_s: float = 60.0,
) -> ProxyProcess:
    """Start ``python -m antorcha.netem.proxy`` (behind ``prefix``, e.g. an ``nsenter`` command) and wait
    until it listens. ``listen_sock`` is handed over as an inherited descriptor: it keeps the network
    namespace it was created in, whatever namespace the proxy process runs in."""
    if (listen is None) == (listen_sock is None):
        raise ValueError("give exactly one of listen=(host, port) and listen_sock=")
    argv = [*prefix, sys.executable, "-m", "antorcha.netem.proxy", "--target", f"{target[0]}:{target[1]}"]
    argv += ["--delay-ms", repr(float(delay_ms))]
    argv += ["--delay-ms-by-source", json.dumps(dict(delay_ms_by_source or {}))]
    pass_fds: tuple[int, ...] = ()
    if listen_sock is not None:
        argv += ["--listen-fd", str(listen_sock.fileno())]
        pass_fds = (listen_sock.fileno(),)
    else:
        assert listen is not None
        argv += ["--listen", f"{listen[0]}:{listen[1]}"]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
        # Its own session: a terminal's Ctrl-C goes to the launcher, which stops the proxy in order.
        start_new_session=True,
    )
    return ProxyProcess(proc, ready_timeout_s)
