"""Slow links on one machine, for benchmarks: a kernel-shaped lab of network namespaces with TCP delay
proxies (``lab``), and an in-process pacer for where that cannot run (``pacer``).

``LinkSpec`` (``links``) is the common description of a link; ``available()`` says whether the lab can
be built here and why not. Names load on first use, so that ``python -m antorcha.netem.proxy`` and
``python -m antorcha.netem.keeper`` start without importing the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from antorcha.netem.lab import METHOD, LabError, NetworkLab, available
    from antorcha.netem.links import LinkSpec, parse_link
    from antorcha.netem.pacer import LinkPacer
    from antorcha.netem.proxy import DelayProxy, ProxyStats

_WHERE = {
    "METHOD": "lab",
    "LabError": "lab",
    "NetworkLab": "lab",
    "available": "lab",
    "LinkSpec": "links",
    "parse_link": "links",
    "LinkPacer": "pacer",
    "DelayProxy": "proxy",
    "ProxyStats": "proxy",
}

__all__ = [
    "METHOD",
    "DelayProxy",
    "LabError",
    "LinkPacer",
    "LinkSpec",
    "NetworkLab",
    "ProxyStats",
    "available",
    "parse_link",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'antorcha.netem' has no attribute {name!r}")
    return getattr(importlib.import_module(f"antorcha.netem.{module}"), name)
