"""antorcha: DiLoCo training across unequal, unreliable volunteer machines.

The package is split by plane: ``coordinator`` (gRPC control plane), ``averaging`` (hivemind data
plane), ``worker`` (the volunteer daemon), with pure training math in ``diloco`` and the model and
data in ``model`` and ``data``. ``antorcha.Client`` submits runs to a coordinator's queue (see
``antorcha.api``).
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1


def __getattr__(name: str) -> object:
    # `antorcha.Client` without making `import antorcha` pull in gRPC and torch.
    if name in ("Client", "RunHandle", "RunInfo"):
        from antorcha import api

        return getattr(api, name)
    raise AttributeError(f"module 'antorcha' has no attribute {name!r}")
