"""Who is in the run: workers, their leases and their progress. Pure: the clock is passed in, no I/O.

Each change returns a reason string so that logs and tests read the same explanation.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from antorcha.averaging.base import PeerDescriptor
from antorcha.protocol import DeviceInfo, Progress


class WorkerState(StrEnum):
    ACTIVE = "active"
    LEFT = "left"
    LOST = "lost"
    EVICTED = "evicted"  # removed by an operator; never admitted again in this run


class UnknownWorkerError(KeyError):
    """The worker id was never admitted, or it left or lost its lease."""


class EvictedWorkerError(PermissionError):
    """The worker was evicted by an operator; it may not take part in this run again."""


@dataclass
class WorkerRecord:
    worker_id: str
    name: str
    peer: PeerDescriptor
    device: DeviceInfo
    slot: int  # order of first admission; decides data shards
    joined_at: float
    last_seen: float
    state: WorkerState = WorkerState.ACTIVE
    leaving: bool = False  # asked to leave; takes effect at the round boundary
    rounds_contributed: int = 0
    progress: Progress = field(default_factory=Progress)


class Membership:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.workers: dict[str, WorkerRecord] = {}
        self.next_slot = 0

    def join(
        self, *, name: str, peer: PeerDescriptor, device: DeviceInfo, now: float, worker_id: str = ""
    ) -> tuple[WorkerRecord, str]:
        known = self.workers.get(worker_id) if worker_id else None
        if known is not None and known.state == WorkerState.EVICTED:
            raise EvictedWorkerError(worker_id)
        if known is not None:
            previous = known.state
            known.peer, known.device, known.name = peer, device, name or known.name
            known.state, known.leaving, known.last_seen = WorkerState.ACTIVE, False, now
            return known, f"worker {worker_id} rejoined (was {previous})"
        new_id = worker_id or f"w-{uuid.uuid4().hex[:10]}"
        record = WorkerRecord(new_id, name or new_id, peer, device, self.next_slot, now, now)
        self.next_slot += 1
        self.workers[new_id] = record
        return record, f"worker {new_id} admitted as slot {record.slot}"

    def replaces_live_process(self, worker_id: str, peer: PeerDescriptor) -> bool:
        """Whether a join under ``worker_id`` comes from a new process while the old one still holds
        the lease: the old one is gone (it crashed, or it left) before its lease ran out.

        Each worker process starts a fresh data-plane peer, so a new peer id means a new process; a
        process that rejoins itself (say after a coordinator restart) keeps its peer id."""
        known = self.workers.get(worker_id) if worker_id else None
        return known is not None and known.state == WorkerState.ACTIVE and known.peer.peer_id != peer.peer_id

    def get_active(self, worker_id: str) -> WorkerRecord:
        record = self.workers.get(worker_id)
        if record is None or record.state != WorkerState.ACTIVE:
            raise UnknownWorkerError(worker_id)
        return record

    def heartbeat(self, worker_id: str, progress: Progress, now: float) -> WorkerRecord:
        record = self.get_active(worker_id)
        record.last_seen, record.progress = now, progress
        return record

    def touch(self, worker_id: str, now: float) -> None:
        self.get_active(worker_id).last_seen = now

    def request_leave(self, worker_id: str) -> str:
        record = self.workers.get(worker_id)
        if record is None or record.state != WorkerState.ACTIVE:
            return f"worker {worker_id} is not active; nothing to do"
        record.leaving = True
        return f"worker {worker_id} leaves at the round boundary"

    def evict(self, worker_id: str) -> tuple[bool, str]:
        """Remove a worker for good, whatever its state; it may not rejoin under this id."""
        record = self.workers.get(worker_id)
        if record is None:
            return False, f"no worker {worker_id!r} in this run"
        if record.state == WorkerState.EVICTED:
            return False, f"worker {worker_id} was already evicted"
        previous = record.state
        record.state, record.leaving = WorkerState.EVICTED, False
        return True, f"worker {worker_id} evicted (was {previous})"

    def apply_leaves(self) -> list[str]:
        """At a round boundary: workers that asked to leave are gone."""
        gone = [r.worker_id for r in self.workers.values() if r.state == WorkerState.ACTIVE and r.leaving]
        for worker_id in gone:
            self.workers[worker_id].state = WorkerState.LEFT
        return gone

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop workers whose lease ran out; returns (worker_id, reason) for each. A worker that said
        it was leaving ends LEFT, any other LOST."""
        dropped = []
        for record in self.workers.values():
            silent = now - record.last_seen
            if record.state == WorkerState.ACTIVE and silent > self.lease_s:
                record.state = WorkerState.LEFT if record.leaving else WorkerState.LOST
                dropped.append((record.worker_id, f"no heartbeat for {silent:.1f}s > lease {self.lease_s}s"))
        return dropped

    def active(self) -> list[WorkerRecord]:
        return sorted(
            (r for r in self.workers.values() if r.state == WorkerState.ACTIVE), key=lambda r: r.slot
        )
