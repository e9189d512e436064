"""antorcha: DiLoCo training across unequal, unreliable volunteer machines.

The package is split by plane: ``coordinator`` (gRPC control plane), ``averaging`` (hivemind data
plane), ``worker`` (the volunteer daemon), with pure training math in ``diloco`` and the model and
data in ``model`` and ``data``.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
