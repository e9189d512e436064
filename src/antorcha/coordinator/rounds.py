"""The round state machine of the coordinator. Pure: events and the clock come in, decisions come out.

A round r goes WAITING (too few workers) → TRAINING (admitted workers run inner steps from θ_r) →
AVERAGING (the group is fixed: the workers that reported in time) → the coordinator's replica applies
the outer step, and round r+1 opens in TRAINING (or the run is FINISHED). Each decision carries a reason.

An operator's pause takes effect at the round boundary: the round in flight finishes, and instead of
opening the next one the machine goes to PAUSED until `resume` (a run WAITING pauses at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    WAITING = "waiting"
    TRAINING = "training"
    AVERAGING = "averaging"
    PAUSED = "paused"
    FINISHED = "finished"


@dataclass(frozen=True)
class Report:
    worker_id: str
    tokens: int
    inner_steps: int
    train_loss: float
    compute_seconds: float


@dataclass(frozen=True)
class Decision:
    form_group: bool
    reason: str
    members: tuple[str, ...] = ()  # worker ids of the group, in group order


@dataclass
class RoundMachine:
    max_rounds: int
    min_workers: int
    deadline_s: float
    round: int = 0
    phase: Phase = Phase.WAITING
    opened_at: float = 0.0
    reports: dict[str, Report] = field(default_factory=dict)
    group: tuple[str, ...] = ()
    paused: bool = False  # an operator asked that no new round opens

    @property
    def _needed(self) -> int:
        """min_workers gates the start of the run; after that, a round goes on with whoever is left."""
        return self.min_workers if self.round == 0 else 1

    def tick(self, now: float, active: set[str]) -> Decision:
        """Advance on time and membership; says when to form the averaging group."""
        if self.phase == Phase.PAUSED:
            return Decision(False, f"paused by the operator; round {self.round} opens on resume")
        if self.phase == Phase.WAITING:
            if len(active) >= self._needed:
                self.phase, self.opened_at = Phase.TRAINING, now
                return Decision(False, f"round {self.round} opened with {len(active)} workers")
            return Decision(False, f"waiting for workers: {len(active)}/{self._needed}")
        if self.phase != Phase.TRAINING:
            return Decision(False, f"round {self.round} is {self.phase}")
        reported = [w for w in self.reports if w in active]
        missing = active - set(reported)
        if reported and not missing:
            return self._form(reported, f"all {len(reported)} active workers reported")
        if reported and now - self.opened_at >= self.deadline_s:
            return self._form(reported, f"deadline {self.deadline_s}s passed; left out {sorted(missing)}")
        return Decision(False, f"round {self.round}: {len(reported)} reported, waiting for {len(missing)}")

    def _form(self, reported: list[str], reason: str) -> Decision:
        self.phase = Phase.AVERAGING
        self.group = tuple(sorted(reported))
        return Decision(True, reason, self.group)

    def report(self, round_: int, report: Report) -> tuple[bool, str]:
        """A worker finished its inner steps of `round_`. Accepted only while that round trains."""
        if self.phase == Phase.FINISHED:
            return False, "the run is finished"
        if round_ != self.round:
            return False, f"report for round {round_}, but round {self.round} is open"
        if self.phase != Phase.TRAINING:
            return False, f"round {self.round} is already {self.phase}; the group was formed without you"
        self.reports[report.worker_id] = report
        return True, f"report of {report.worker_id} for round {round_} accepted"

    def close(self, now: float, active: set[str]) -> str:
        """The outer step of the current round is done: open the next round or finish."""
        finished = self.round
        self.round += 1
        self.reports, self.group = {}, ()
        if self.max_rounds and self.round >= self.max_rounds:
            self.phase = Phase.FINISHED
            return f"round {finished} closed; run finished after {self.round} rounds"
        if self.paused:
            self.phase = Phase.PAUSED
            return f"round {finished} closed; paused: round {self.round} opens on resume"
        if len(active) >= self._needed:
            self.phase, self.opened_at = Phase.TRAINING, now
            return f"round {finished} closed; round {self.round} opened with {len(active)} workers"
        self.phase = Phase.WAITING
        return f"round {finished} closed; waiting for workers to open round {self.round}"

    def stop_after_current(self) -> str:
        """End the run at the next round boundary (a cancelled run): a round in flight still finishes."""
        if self.phase == Phase.FINISHED:
            return "the run is finished"
        if self.phase in (Phase.WAITING, Phase.PAUSED):
            self.phase = Phase.FINISHED
            return f"run ended before round {self.round} opened"
        self.max_rounds = self.round + 1
        return f"run ends after round {self.round}"

    def pause(self) -> tuple[bool, str]:
        """No new round opens until `resume`; the round in flight (training or averaging) finishes."""
        if self.phase == Phase.FINISHED:
            return False, "the run is finished"
        if self.paused:
            return False, f"already paused (round {self.round} is {self.phase})"
        self.paused = True
        if self.phase == Phase.WAITING:
            self.phase = Phase.PAUSED
            return True, f"paused; round {self.round} opens on resume"
        return True, f"pausing: round {self.round} finishes, round {self.round + 1} opens on resume"

    def resume(self) -> tuple[bool, str]:
        """Rounds open again: a paused round waits for workers as usual (the next tick opens it)."""
        if not self.paused:
            return False, "not paused"
        self.paused = False
        if self.phase == Phase.PAUSED:
            self.phase = Phase.WAITING
            return True, f"resumed; round {self.round} opens"
        return True, f"resumed before round {self.round} finished; the run goes on without a pause"
