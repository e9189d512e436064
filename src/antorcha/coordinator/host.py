"""Runs one run after another on one coordinator process: builds each run's core (replica, store,
checkpoints in the run's own folder), ticks it, and when it ends records its summary and moves to the
next queued run. Connected workers notice the switch through Discover (`run_active`, `serves_queue`)
and join the next run without a restart (see worker/daemon.py).

Folders: the run named in the coordinator's config keeps the data_dir itself (`run.sqlite`,
`checkpoints/`, as before the queue existed); every submitted run gets `data_dir/runs/<run_id>/`. Each
ended run leaves `summary.json` in its folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from antorcha.averaging.base import AveragingBackend
from antorcha.config import CoordinatorSettings, RunSpec
from antorcha.coordinator.checkpoints import CheckpointStore
from antorcha.coordinator.core import CoordinatorCore
from antorcha.coordinator.replica import CoordinatorReplica
from antorcha.coordinator.runs import ENDED, RunEntry, RunQueue, RunState
from antorcha.coordinator.store import RunStore

log = logging.getLogger(__name__)

SWITCH_GRACE_S = 3.0  # after a run ends, let its workers' last commits and leaves be answered


class RunHost:
    def __init__(
        self,
        settings: CoordinatorSettings,
        initial: RunSpec,
        backend: AveragingBackend,
        data_dir: Path | None,
    ) -> None:
        self.settings, self.initial, self.backend, self.data_dir = settings, initial, backend, data_dir
        self.queue = RunQueue(data_dir / "queue.sqlite" if data_dir is not None else None)
        self.core: CoordinatorCore | None = None
        self.entry: RunEntry | None = None
        self.on_switch: list[Callable[[CoordinatorCore], None]] = []
        self._ticks: asyncio.Task[None] | None = None
        self._ended_at: float | None = None
        self.cancelling: set[str] = set()

    def run_dir(self, run_id: str) -> Path | None:
        if self.data_dir is None:
            return None
        if run_id == self.initial.run_id:
            return self.data_dir
        return self.data_dir / "runs" / run_id

    @property
    def serves_queue(self) -> bool:
        """Workers should stay after their run ends: another run is queued, or the operator said wait."""
        return self.settings.wait_for_runs or self.queue.next_queued() is not None

    async def start(self) -> CoordinatorCore:
        if not self.queue.all():
            self.queue.submit(self.initial.run_id, self.initial.model_dump_json())
        entry = self.queue.running() or self.queue.next_queued() or self.queue.all()[-1]
        return await self._open(entry)

    async def _open(self, entry: RunEntry) -> CoordinatorCore:
        spec = RunSpec.model_validate_json(entry.spec_json)
        folder = self.run_dir(spec.run_id)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        # Building the replica loads data and a model: seconds of CPU, kept off the event loop.
        replica = await asyncio.to_thread(CoordinatorReplica, spec)
        store = RunStore(folder / "run.sqlite") if folder is not None else None
        checkpoints = (
            CheckpointStore(folder / "checkpoints", self.settings.checkpoints_keep) if folder else None
        )
        core = CoordinatorCore(spec, self.settings, replica, self.backend, store, checkpoints)
        await core.start()
        if entry.state == RunState.QUEUED:
            self.queue.start(spec.run_id)
        self.core, self.entry, self._ended_at = core, self.queue.get(spec.run_id), None
        if self._ticks is not None:
            self._ticks.cancel()
        self._ticks = asyncio.create_task(core.run_ticks())
        for callback in self.on_switch:
            callback(core)
        log.info("run %s started (queue position %d)", spec.run_id, entry.position)
        return core

    async def supervise(self, interval_s: float = 0.5) -> None:
        """Forever: record a run's end, then open the next queued run once its workers were answered."""
        while True:
            await asyncio.sleep(interval_s)
            core, entry = self.core, self.entry
            if core is None or entry is None:
                continue
            if entry.run_id in self.cancelling and not core.finished:
                core.rounds.stop_after_current()
            if not core.finished:
                continue
            if self._ended_at is None:
                self._ended_at = time.monotonic()
                self._record_end(core)
            nxt = self.queue.next_queued()
            if nxt is not None and time.monotonic() - self._ended_at >= SWITCH_GRACE_S:
                log.info("run %s ended; next run %s", entry.run_id, nxt.run_id)
                old = core
                try:
                    await self._open(nxt)
                except Exception as e:  # a spec that validated but cannot be built: skip it, say why
                    log.exception("run %s could not start", nxt.run_id)
                    self.queue.end(nxt.run_id, RunState.FAILED, f"could not start: {e}")
                    continue
                old.close()

    def _record_end(self, core: CoordinatorCore) -> None:
        run_id = core.spec.run_id
        entry = self.queue.get(run_id)
        if entry is None or entry.state in ENDED:
            return
        state = RunState.CANCELLED if run_id in self.cancelling else RunState.FINISHED
        summary = run_summary(core, self.run_dir(run_id))
        folder = self.run_dir(run_id)
        if folder is not None:
            tmp = folder / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1))
            tmp.replace(folder / "summary.json")
        self.queue.end(run_id, state, entry.detail if state == RunState.CANCELLED else "", summary)
        self.entry = self.queue.get(run_id)
        log.info("run %s %s after %d rounds", run_id, state, summary["rounds"])

    def cancel(self, run_id: str, reason: str) -> tuple[bool, str]:
        changed, message, state = self.queue.request_cancel(run_id, reason)
        if state == RunState.RUNNING and self.core is not None and self.core.spec.run_id == run_id:
            self.cancelling.add(run_id)
            self.core.rounds.stop_after_current()
        return changed, message

    async def close(self) -> None:
        if self._ticks is not None:
            self._ticks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        if self.core is not None:
            self.core.close()
        self.queue.close()


def run_summary(core: CoordinatorCore, folder: Path | None) -> dict[str, Any]:
    history = core.history
    evaluated = [h.eval_loss for h in history if math.isfinite(h.eval_loss)]

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "run_id": core.spec.run_id,
        "rounds": len(history),
        "initial_eval_loss": num(core.initial_eval_loss),
        "final_eval_loss": evaluated[-1] if evaluated else None,
        "tokens": sum(h.tokens for h in history),
        "data_plane_bytes": sum(h.data_plane_bytes for h in history),
        "control_plane_bytes": core.control_plane_bytes,
        "replicas_consistent": bool(history) and all(h.consistent for h in history),
        "seconds": sum(h.seconds for h in history),
        "workers": sorted({w for h in history for w in h.commits}),
        "folder": str(folder) if folder is not None else None,
        "checkpoints": str(folder / "checkpoints") if folder is not None else None,
        "round_log": [
            {
                "round": h.round,
                "workers": h.workers,
                "tokens": h.tokens,
                "train_loss": num(h.train_loss),
                "eval_loss": num(h.eval_loss),
                "data_plane_bytes": h.data_plane_bytes,
                "seconds": h.seconds,
                "checksum": h.checksum,
            }
            for h in history
        ],
    }
