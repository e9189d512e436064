"""The averaging interface: what the worker and the coordinator's replica ask of any data-plane backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class PeerDescriptor:
    """How other data-plane peers reach this one."""

    peer_id: str
    maddrs: tuple[str, ...]
    client_mode: bool


@dataclass(frozen=True)
class GroupMember:
    peer_id: str
    maddrs: tuple[str, ...]
    weight: float  # tokens this member trained on in the round; 0 = receive only
    reduce_fraction: float  # share of the vector this member reduces; 0 for client-mode peers
    worker_id: str = ""


@dataclass(frozen=True)
class AveragingGroup:
    """One round's all-reduce, as decided by the coordinator. Every member gets the same object."""

    group_id: str
    members: tuple[GroupMember, ...]
    codec: str = "none"
    timeout_s: float = 30.0

    def member(self, peer_id: str) -> GroupMember:
        for m in self.members:
            if m.peer_id == peer_id:
                return m
        raise KeyError(f"peer {peer_id} is not in group {self.group_id}")


@dataclass
class AllReduceResult:
    average: torch.Tensor  # the weighted mean, bitwise identical on every member that got every span
    bytes_sent: int = 0
    bytes_received: int = 0
    failed_spans: int = 0  # spans whose reducer failed; left at zero (no update) in `average`
    seconds: float = 0.0
    contributors: dict[int, int] = field(default_factory=dict)  # span index -> senders averaged
    # What the reducers received from this member, decoded (equals the input with a lossless codec):
    # input − sent is the quantisation residual that error feedback carries into the next round.
    sent: torch.Tensor | None = None

    @property
    def bytes_total(self) -> int:
        return self.bytes_sent + self.bytes_received


class AveragingBackend(Protocol):
    @property
    def peer(self) -> PeerDescriptor: ...

    def all_reduce(
        self,
        group: AveragingGroup,
        vector: torch.Tensor,
        weight: float,
        on_exchange: Callable[[], object] | None = None,
    ) -> AllReduceResult:
        """Average `vector` (flat fp32 CPU) with the group's members, weighted; blocks until done."""
        ...

    def close(self) -> None: ...
