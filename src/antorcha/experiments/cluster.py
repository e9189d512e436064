"""A coordinator and workers as real OS processes on 127.0.0.1, for the demo, tests and experiments.

Each process runs in its own session (process group) so that stopping it also stops what it forked
(hivemind's DHT process and its p2pd daemon). The gRPC port is picked by the OS (port 0) and read back
from a ready file, so parallel clusters never race for it. The dashboard's HTTP port and workers'
metrics ports (where asked for) are free ports found just before the process starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.worker.client import CoordinatorClient


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, e.g. run.data or run.hf_model_config
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


class LocalCluster:
    def __init__(
        self,
        workdir: Path,
        run: dict[str, Any] | None = None,
        coordinator: dict[str, Any] | None = None,
        worker_threads: int = 1,
        wrap: Callable[[str, list[str]], list[str]] | None = None,
        client_options: dict[str, Any] | None = None,
        worker_defaults: dict[str, Any] | None = None,
    ) -> None:
        """`wrap(name, argv)` may rewrite each process's command line, e.g. to run it inside a network
        namespace of a slow-link lab. `client_options` go to this process's own CoordinatorClient (e.g.
        `operator_token`, `tls_ca_file` when the coordinator has auth or TLS on); `worker_defaults` go
        into every worker's settings (e.g. its join `token` and `tls_ca_file`)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run = run or {}
        # The dashboard's port is fixed for the cluster's life, so a restarted coordinator keeps its URL.
        self.coordinator_settings = {"port": 0, "http_port": free_port(), **(coordinator or {})}
        self.worker_threads = worker_threads
        self.wrap = wrap
        self.client_options = client_options or {}
        self.worker_defaults = worker_defaults or {}
        self.address = ""
        self.http_address = ""  # host:port of the dashboard and /metrics; empty when turned off
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._client: CoordinatorClient | None = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child's lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "antorcha", *args]
        return subprocess.Popen(
            self.wrap(name, argv) if self.wrap is not None else argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    def start_coordinator(
        self,
        timeout_s: float = 120.0,
        worker_address: str | None = None,
        status_address: str | None = None,
    ) -> str:
        """Start the coordinator and wait until it is ready. In a slow-link lab, workers reach it at
        `worker_address` (through the lab) and this process polls it at `status_address`."""
        config = self.workdir / "coordinator.toml"
        write_toml(config, {"coordinator": self.coordinator_settings, "run": self.run})
        ready = self.workdir / "coordinator.ready"
        ready.unlink(missing_ok=True)
        self.coordinator = self._spawn(
            "coordinator", ["coordinator", "--config", str(config), "--ready-file", str(ready)]
        )
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.coordinator.poll() is not None:
                raise RuntimeError(
                    f"coordinator exited with {self.coordinator.returncode}: {self.tail('coordinator')}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator not ready after {timeout_s}s: {self.tail('coordinator')}")
            time.sleep(0.1)
        announced = json.loads(ready.read_text())
        self.address = worker_address or announced["address"]
        self.http_address = announced.get("http_address", "")
        if self._client is not None:
            self._client.close()
        self._client = CoordinatorClient(
            status_address or self.address, timeout_s=10.0, **self.client_options
        )
        return self.address

    def start_worker(self, name: str, extra: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
        config = self.workdir / f"{name}.toml"
        settings = {
            "coordinator": self.address,
            "name": name,
            "torch_threads": self.worker_threads,
            "identity_file": str(self.workdir / f"{name}.id"),
            **self.worker_defaults,
            **(extra or {}),
        }
        write_toml(config, {"worker": settings})
        proc = self._spawn(name, ["worker", "--config", str(config)])
        self.workers[name] = proc
        return proc

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.http_address}/" if self.http_address else ""

    def status(self) -> pb.RunStatus:
        assert self._client is not None, "start the coordinator first"
        return self._client.run_status()

    def wait_for(
        self, predicate: Callable[[pb.RunStatus], bool], timeout_s: float, poll_s: float = 0.3
    ) -> pb.RunStatus:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"condition not met in {timeout_s}s; round={status.round} phase={status.phase}"
                )
            time.sleep(poll_s)

    def _check_alive(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is not None:
            raise RuntimeError(
                f"coordinator died ({self.coordinator.returncode}): {self.tail('coordinator')}"
            )

    def wait_workers(self, timeout_s: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout_s
        for proc in self.workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        return {name: p.poll() for name, p in self.workers.items()}

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def stop(self, grace_s: float = 5.0) -> None:
        procs = [*self.workers.values(), *([self.coordinator] if self.coordinator else [])]
        for proc in procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in procs:  # also reaps what they forked (DHT process, p2pd) even if the leader exited
            self.kill(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
