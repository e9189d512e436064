"""The namespace keeper: one small process that owns a lab's network namespaces and tears them down.

Why a process, and not named namespaces (``ip netns add``): a named namespace is a bind mount under
/run/netns that outlives a killed launcher, and every lab would need unique names. The keeper instead
creates anonymous namespaces with ``unshare(CLONE_NEWNET)`` and holds each one only by an open file
descriptor, so nothing is ever named or created in the host's namespace. Others enter a namespace
through ``/proc/<keeper pid>/fd/<n>`` (``nsenter --net=...``).

The keeper stops when its stdin reaches EOF, that is when the launcher says ``stop`` or closes the pipe,
or when the launcher dies for any reason, SIGKILL included (the kernel closes the pipe). It then
closes its descriptors (no one can enter any more), sends SIGTERM to every process still inside one
of its namespaces, SIGKILL after a grace period, and exits. With no process and no descriptor left, the
kernel destroys each namespace, and with it the bridge, the veth pairs and their qdiscs. It runs in
its own session so that a terminal's Ctrl-C reaches the launcher, not the keeper.

Protocol on stdout, one JSON object per line: ``{"event": "ready", "pid": ..., "fds": [...]}`` once the
namespaces exist, ``{"event": "done", "killed": [...], "left": [...]}`` after the teardown.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def create_namespaces(count: int) -> list[int]:
    """Create ``count`` fresh network namespaces; return a descriptor for each. The calling thread
    ends up back in the namespace it started in."""
    libc = _libc()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    fds: list[int] = []
    try:
        for _ in range(count):
            if libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (needs CAP_SYS_ADMIN)")
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    finally:
        # Only if we left: without CAP_SYS_ADMIN setns fails too and would hide the unshare error.
        if fds and libc.setns(home, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns back to the original namespace failed: {os.strerror(err)}")
        os.close(home)
    return fds


def processes_in(inodes: set[int], exclude: int) -> list[int]:
    """Pids of the processes whose network namespace is one of ``inodes``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        # A process may exit or be unreadable while we look; it is then not ours to kill.
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def teardown(fds: list[int], grace_s: float, deadline_s: float = 20.0) -> tuple[list[int], list[int]]:
    """Close the namespaces' descriptors, then end every process inside them. Returns (killed, left)."""
    inodes = {os.fstat(fd).st_ino for fd in fds}
    for fd in fds:
        os.close(fd)
    me = os.getpid()
    killed: set[int] = set()
    start = time.monotonic()
    while True:
        pids = processes_in(inodes, me)
        if not pids:
            return sorted(killed), []
        elapsed = time.monotonic() - start
        if elapsed > deadline_s:
            return sorted(killed), pids
        # Newly seen processes (children forked meanwhile) get the polite signal too, then the grace.
        _signal_all([p for p in pids if p not in killed], signal.SIGTERM)
        killed.update(pids)
        if elapsed > grace_s:
            _signal_all(pids, signal.SIGKILL)
        time.sleep(0.05)


def _emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m antorcha.netem.keeper", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--count", type=int, required=True, help="how many network namespaces to create")
    parser.add_argument("--grace-s", type=float, default=3.0, help="SIGTERM → SIGKILL grace at teardown")
    args = parser.parse_args(argv)
    # The launcher decides when we stop; until then, signals that a terminal or a process group
    # receives must not take the namespaces away from under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        fds = create_namespaces(args.count)
    except OSError as e:
        _emit("error", message=str(e))
        sys.exit(1)
    try:
        _emit("ready", pid=os.getpid(), fds=fds)
        for line in sys.stdin:
            if line.strip() == "stop":
                break
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown
        killed, left = teardown(fds, args.grace_s)
        with contextlib.suppress(OSError):
            _emit("done", killed=killed, left=left)


if __name__ == "__main__":
    main()
