"""Who averages in a round and with what weight: the group the coordinator sends every member.
Pure: peers and reports in, an `AveragingGroup` out.

The coordinator's own peer comes first with weight 0 (it receives the average for its replica and,
when reachable, reduces a span); then the workers that reported, in the round machine's order, each
weighted by the tokens it trained in the round, so a worker that trained more (a fast one in a
token-budget round, or one that joined early) counts more. Client-mode peers reduce nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from antorcha.averaging.base import AveragingGroup, GroupMember, PeerDescriptor


def make_group(
    group_id: str,
    coordinator: PeerDescriptor,
    workers: Sequence[tuple[str, PeerDescriptor]],
    tokens: Mapping[str, int],
    codec: str,
    timeout_s: float,
) -> AveragingGroup:
    """`workers`: (worker id, its peer) in group order; `tokens`: what each reported for the round."""
    members = [GroupMember(coordinator.peer_id, coordinator.maddrs, 0.0, _reduces(coordinator), "")]
    for worker_id, peer in workers:
        weight = float(tokens[worker_id])
        members.append(GroupMember(peer.peer_id, peer.maddrs, weight, _reduces(peer), worker_id))
    return AveragingGroup(group_id, tuple(members), codec, timeout_s)


def _reduces(peer: PeerDescriptor) -> float:
    return 0.0 if peer.client_mode else 1.0
