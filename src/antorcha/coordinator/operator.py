"""What an operator can do to a running coordinator: pause and resume the run, evict a worker.
(Who counts as an operator is decided before these run, by `antorcha.security.guard`.)

Pause: the round in flight finishes (its workers train, average and commit as usual); the next round
does not open. Workers asking for data of an unopened round are told to wait and ask again. Resume
opens it. A pause survives a coordinator restart.

Evict: the worker is removed from the run for good. Its state becomes `evicted`; its open data leases
go back to the pool (unless it is already in the averaging group of the round in flight: its Δ is in
that average, so its shards of that round count as trained); a report it sent for the round still
training is withdrawn, so the group forms without it; every later RPC it makes (heartbeats included)
is refused with PERMISSION_DENIED and the operator's reason, which makes the worker exit (code 3);
Join with its id is refused the same way, across coordinator restarts. The ban is of a worker id: a
process that forgets its identity file joins as a new worker. Barring a person or machine is done
by revoking its join token (`antorcha token revoke`).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from antorcha.coordinator.membership import WorkerState
from antorcha.coordinator.rounds import Phase

if TYPE_CHECKING:
    from antorcha.coordinator.core import CoordinatorCore

log = logging.getLogger(__name__)


class OperatorControls:
    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core
        self.evicted: dict[str, str] = {}  # worker id -> the operator's reason

    def pause(self, reason: str = "") -> tuple[bool, str]:
        core = self.core
        changed, message = core.rounds.pause()
        if changed:
            self._save()
            core.telemetry.event("pause", round_=core.rounds.round, detail=reason or message)
            log.info("operator: %s (%s)", message, reason or "no reason given")
        return changed, message

    def resume(self) -> tuple[bool, str]:
        core = self.core
        changed, message = core.rounds.resume()
        if changed:
            self._save()
            core.telemetry.event("resume", round_=core.rounds.round, detail=message)
            log.info("operator: %s", message)
        return changed, message

    def evict(self, worker_id: str, reason: str = "") -> tuple[bool, str]:
        core = self.core
        changed, message = core.members.evict(worker_id)
        if not changed:
            return False, message
        reason = reason or "no reason given"
        self.evicted[worker_id] = reason
        core.forget_process(worker_id)  # out of the forming group; in a formed one its shards count
        core.shard_seconds.pop(worker_id, None)
        if core.store is not None:
            with core.store.transaction():
                core.store.save_worker(core.members.workers[worker_id])
                self._save()
        core.telemetry.event("evict", worker_id, core.rounds.round, reason)
        log.warning("operator: %s: %s", message, reason)
        return True, f"{message}: {reason}"

    def refusal(self, worker_id: str) -> str:
        """The message an evicted worker gets ("" if it was not evicted)."""
        reason = self.evicted.get(worker_id)
        if reason is None:
            record = self.core.members.workers.get(worker_id)
            if record is None or record.state != WorkerState.EVICTED:
                return ""
            reason = "no reason recorded"
        return (
            f"worker {worker_id} was evicted from run {self.core.spec.run_id!r} by the operator "
            f"({reason}); it may not rejoin this run"
        )

    @property
    def evictions(self) -> int:
        return len(self.evicted)

    def _save(self) -> None:
        store = self.core.store
        if store is not None:
            store.set_meta(
                "operator", json.dumps({"paused": self.core.rounds.paused, "evicted": self.evicted})
            )

    def restore(self) -> None:
        """After a restart: the pause and the evictions, as they were."""
        store = self.core.store
        saved = json.loads((store.get_meta("operator") if store is not None else None) or "{}")
        self.evicted = dict(saved.get("evicted", {}))
        rounds = self.core.rounds
        if saved.get("paused") and rounds.phase != Phase.FINISHED:
            rounds.paused, rounds.phase = True, Phase.PAUSED
