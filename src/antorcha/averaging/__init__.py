"""The data plane: all-reduce of pseudo-gradients among a group the coordinator fixed.

`base` holds the interface every backend implements; `hivemind_backend` is the libp2p one.
"""

from antorcha.averaging.base import (
    AllReduceResult,
    AveragingBackend,
    AveragingGroup,
    GroupMember,
    PeerDescriptor,
)

__all__ = ["AllReduceResult", "AveragingBackend", "AveragingGroup", "GroupMember", "PeerDescriptor"]
