"""The Python face of a coordinator for researchers: submit runs to its queue, wait for them, read
their metrics.

    from antorcha import Client
    with Client("coordinator.example:50051", token=OPERATOR_TOKEN, tls=True) as client:
        run = client.submit("experiments/my_run.toml")   # or a RunSpec, or a dict of RunSpec fields
        info = run.wait()                                # until finished, cancelled or failed
        print(info.summary["final_eval_loss"], run.metrics()[-1])

Submitting and cancelling need an operator token when the coordinator's auth is on.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antorcha.config import RunSpec
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.worker.client import CoordinatorClient

ENDED_STATES = {"finished", "cancelled", "failed"}


def load_spec(source: RunSpec | Mapping[str, Any] | str | Path) -> RunSpec:
    """A RunSpec from itself, a dict of its fields, or a TOML file (a [run] table, or the fields at top)."""
    if isinstance(source, RunSpec):
        return source
    if isinstance(source, Mapping):
        return RunSpec.model_validate(dict(source))
    path = Path(source)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"cannot read run spec {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    return RunSpec.model_validate(data.get("run", data))


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    state: str
    position: int
    submitted_unix: float
    started_unix: float
    finished_unix: float
    detail: str
    summary: dict[str, Any] = field(default_factory=dict)
    spec_json: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @classmethod
    def from_pb(cls, entry: pb.RunEntry) -> RunInfo:
        return cls(
            entry.run_id,
            entry.state,
            entry.position,
            entry.submitted_unix,
            entry.started_unix,
            entry.finished_unix,
            entry.detail,
            json.loads(entry.summary_json) if entry.summary_json else {},
            entry.run_spec_json,
        )


class RunHandle:
    """One submitted run."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def info(self) -> RunInfo:
        return self.client.run_info(self.run_id)

    def wait(self, timeout_s: float | None = None, poll_s: float = 1.0) -> RunInfo:
        """Block until the run ended; TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.info()
            if info.ended:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id} is still {info.state} after {timeout_s}s")
            time.sleep(poll_s)

    def metrics(self) -> list[dict[str, Any]]:
        """The run's round log (round, workers, tokens, losses, bytes, seconds): live while it trains,
        from its recorded summary once it ended."""
        info = self.info()
        if info.ended:
            return list(info.summary.get("round_log", []))
        status = self.client.coordinator.run_status(rounds_since=0, rounds_limit=10_000)
        if status.run_id != self.run_id:
            return []  # still queued
        return [
            {
                "round": r.round,
                "workers": r.workers,
                "tokens": r.tokens,
                "train_loss": r.train_loss,
                "eval_loss": r.eval_loss,
                "data_plane_bytes": r.data_plane_bytes,
                "seconds": r.seconds,
                "checksum": r.checksum,
            }
            for r in status.rounds
        ]

    def cancel(self, reason: str = "") -> str:
        return self.client.cancel(self.run_id, reason)

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"


class Client:
    def __init__(
        self,
        address: str,
        token: str = "",
        tls: bool = False,
        tls_ca_file: str = "",
        timeout_s: float = 30.0,
    ) -> None:
        self.coordinator = CoordinatorClient(
            address, timeout_s, tls=tls, tls_ca_file=tls_ca_file, operator_token=token
        )

    def _rpc(self, method: str, request: Any) -> Any:
        return self.coordinator.operator_call(getattr(self.coordinator.stub, method), request)

    def submit(self, spec: RunSpec | Mapping[str, Any] | str | Path) -> RunHandle:
        entry = self._rpc("SubmitRun", pb.SubmitRunRequest(run_spec_json=load_spec(spec).model_dump_json()))
        return RunHandle(self, entry.run_id)

    def runs(self) -> list[RunInfo]:
        return [RunInfo.from_pb(e) for e in self._rpc("ListRuns", pb.ListRunsRequest()).runs]

    def current_run(self) -> str:
        return str(self._rpc("ListRuns", pb.ListRunsRequest()).current_run_id)

    def run_info(self, run_id: str) -> RunInfo:
        for info in self.runs():
            if info.run_id == run_id:
                return info
        raise KeyError(f"no run {run_id!r} on this coordinator")

    def run(self, run_id: str) -> RunHandle:
        self.run_info(run_id)
        return RunHandle(self, run_id)

    def cancel(self, run_id: str, reason: str = "") -> str:
        answer = self._rpc("CancelRun", pb.CancelRunRequest(run_id=run_id, reason=reason))
        return str(answer.message)

    def close(self) -> None:
        self.coordinator.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
