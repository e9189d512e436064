"""The boundary between protobuf messages and the plain dataclasses the rest of antorcha uses.

Only this module, the gRPC servicer/client adapters and the data-plane transport touch generated
protobuf classes; everything else works with the frozen dataclasses below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from antorcha.averaging.base import AveragingGroup, GroupMember, PeerDescriptor
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb


@dataclass(frozen=True)
class DeviceInfo:
    kind: str = "cpu"
    name: str = ""
    memory_bytes: int = 0
    tokens_per_second: float = 0.0


@dataclass(frozen=True)
class Progress:
    round: int = 0
    inner_step: int = 0
    tokens: int = 0
    loss: float = math.nan
    tokens_per_second: float = 0.0


def device_to_pb(d: DeviceInfo) -> pb.DeviceInfo:
    return pb.DeviceInfo(
        kind=d.kind, name=d.name, memory_bytes=d.memory_bytes, tokens_per_second=d.tokens_per_second
    )


def device_from_pb(m: pb.DeviceInfo) -> DeviceInfo:
    return DeviceInfo(m.kind, m.name, m.memory_bytes, m.tokens_per_second)


def progress_to_pb(p: Progress) -> pb.Progress:
    return pb.Progress(
        round=p.round,
        inner_step=p.inner_step,
        tokens=p.tokens,
        loss=p.loss,
        tokens_per_second=p.tokens_per_second,
    )


def progress_from_pb(m: pb.Progress) -> Progress:
    return Progress(m.round, m.inner_step, m.tokens, m.loss, m.tokens_per_second)


def peer_to_pb(p: PeerDescriptor) -> pb.PeerInfo:
    return pb.PeerInfo(peer_id=p.peer_id, maddrs=list(p.maddrs), client_mode=p.client_mode)


def peer_from_pb(m: pb.PeerInfo) -> PeerDescriptor:
    return PeerDescriptor(m.peer_id, tuple(m.maddrs), m.client_mode)


def group_to_pb(g: AveragingGroup) -> pb.AveragingGroup:
    return pb.AveragingGroup(
        group_id=g.group_id,
        codec=g.codec,
        timeout_seconds=g.timeout_s,
        members=[
            pb.GroupMember(
                peer_id=m.peer_id,
                maddrs=list(m.maddrs),
                weight=m.weight,
                reduce_fraction=m.reduce_fraction,
                worker_id=m.worker_id,
            )
            for m in g.members
        ],
    )


def group_from_pb(m: pb.AveragingGroup) -> AveragingGroup:
    return AveragingGroup(
        group_id=m.group_id,
        codec=m.codec,
        timeout_s=m.timeout_seconds,
        members=tuple(
            GroupMember(x.peer_id, tuple(x.maddrs), x.weight, x.reduce_fraction, x.worker_id)
            for x in m.members
        ),
    )
