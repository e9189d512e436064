"""Deterministic fault injection for chaos tests and experiments: a plan of (round, phase) → action.

Wall-clock fault tests flake; a plan fires at an exact point of the worker's loop instead. The plan
comes from the worker setting `fault_plan` (JSON), e.g.
`[{"round": 2, "phase": "allreduce", "action": "kill"}, {"round": 3, "phase": "train", "step": 4,
"action": "stall", "seconds": 30}]`. Phases: train (before inner step `step`), report (group known,
before averaging), allreduce (after the first chunk exchange), commit (after the outer step, before
CommitRound), download (cut the state stream after `bytes` bytes). Actions: kill (SIGKILL itself,
like `kill -9`), stall (sleep `seconds`), nan (poison the pseudo-gradient it sends), cut (download only).

Hostile or broken pseudo-gradients and claims (phase report; they fire before ReportRound, so several
may fire in one round, see `fire_all`): nan (one NaN), scale (Δ × `factor`, e.g. -10: poisoning),
zero (a lazy worker: Δ = 0), random (noise of Δ's norm: a lazy worker hiding), shape (every chunk it
sends on the data plane is one element short), claim_tokens (report `factor` × its tokens). With
`declared` the norm it declares in ReportRound is that of the corrupted Δ (a buggy worker); without,
that of its real Δ (a lying one). `repeat` fires the fault at `round` and every later round.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

log = logging.getLogger(__name__)

Phase = Literal["train", "report", "allreduce", "commit", "download"]
Action = Literal["kill", "stall", "nan", "cut", "scale", "zero", "random", "shape", "claim_tokens"]
# Actions that rewrite the pseudo-gradient the worker sends.
DELTA_ACTIONS = frozenset({"nan", "scale", "zero", "random"})


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    phase: Phase
    action: Action
    step: int = Field(0, ge=0, description="train: fire before this inner step")
    seconds: float = Field(0.0, ge=0, description="stall: how long")
    bytes: int = Field(0, ge=0, description="download/cut: after how many bytes")
    factor: float = Field(1.0, description="scale: multiply Δ by this; claim_tokens: multiply the tokens")
    declared: bool = Field(False, description="declare the corrupted Δ's norm (else the real one's)")
    repeat: bool = Field(False, description="fire at `round` and at every later round")

    def matches(self, round_: int, phase: Phase, step: int = 0) -> bool:
        at = self.round <= round_ if self.repeat else self.round == round_
        return at and self.phase == phase and (phase != "train" or self.step == step)


@dataclass
class FaultPlan:
    faults: list[Fault]

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        if not text.strip():
            return cls([])
        return cls(TypeAdapter(list[Fault]).validate_python(json.loads(text)))

    def find(self, round_: int, phase: Phase, step: int = 0) -> Fault | None:
        for fault in self.faults:
            if fault.matches(round_, phase, step):
                return fault
        return None

    def fire_all(self, round_: int, phase: Phase) -> list[Fault]:
        """Every fault due at (round, phase), for the caller to apply (kill and stall are carried out)."""
        fired = []
        while (fault := self.find(round_, phase)) is not None and fault not in fired:
            fired.append(fault)
            self.fire(round_, phase)
        return fired

    def fire(self, round_: int, phase: Phase, step: int = 0) -> Fault | None:
        """Carry out kill and stall here; return the fault for actions the caller must apply."""
        fault = self.find(round_, phase, step)
        if fault is None:
            return None
        log.warning("fault plan fires round=%d phase=%s action=%s", round_, phase, fault.action)
        if fault.action == "kill":
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.action == "stall":
            time.sleep(fault.seconds)
        if not fault.repeat:
            self.faults.remove(fault)  # each fault fires once
        else:  # stays for later rounds; move it last so that the next fault due now is found
            self.faults.remove(fault)
            self.faults.append(fault)
        return fault
