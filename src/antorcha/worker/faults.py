"""Deterministic fault injection for chaos tests and experiments: a plan of (round, phase) → action.

Wall-clock fault tests flake; a plan fires at an exact point of the worker's loop instead. The plan
comes from the worker setting `fault_plan` (JSON), e.g.
`[{"round": 2, "phase": "allreduce", "action": "kill"}, {"round": 3, "phase": "train", "step": 4,
"action": "stall", "seconds": 30}]`. Phases: train (before inner step `step`), report (group known,
before averaging), allreduce (after the first chunk exchange), commit (after the outer step, before
CommitRound), download (cut the state stream after `bytes` bytes). Actions: kill (SIGKILL itself,
like `kill -9`), stall (sleep `seconds`), nan (poison the pseudo-gradient it sends), cut (download only).
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
Action = Literal["kill", "stall", "nan", "cut"]


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    phase: Phase
    action: Action
    step: int = Field(0, ge=0, description="train: fire before this inner step")
    seconds: float = Field(0.0, ge=0, description="stall: how long")
    bytes: int = Field(0, ge=0, description="download/cut: after how many bytes")


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
            if fault.round == round_ and fault.phase == phase and (phase != "train" or fault.step == step):
                return fault
        return None

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
        self.faults.remove(fault)  # each fault fires once
        return fault
