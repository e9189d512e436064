"""What an emulated link is: ``LinkSpec`` (bandwidth and round-trip time) and its text form.

A node's link is the path between that node and the rest of the network. The lab (``lab.py``) and the
in-process pacer (``pacer.py``) both take their figures from here, so every slow-link measurement can
print the same spec it ran with, e.g. ``100mbit/100ms``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Well above any link a volunteer has; also keeps tc's 64-bit rates and our integer conversions sane.
MAX_BANDWIDTH_MBIT = 1_000_000.0
MAX_RTT_MS = 60_000.0

_BANDWIDTH_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_SPEC = re.compile(r"^\s*([0-9.eE+]+)\s*([a-zA-Z]+)\s*/\s*([0-9.eE+]+)\s*([a-zA-Z]+)\s*$")


@dataclass(frozen=True)
class LinkSpec:
    """A node's link: bandwidth in Mbit/s (each direction) and round-trip time in milliseconds."""

    bandwidth_mbit: float
    rtt_ms: float

    def __post_init__(self) -> None:
        _check_number("bandwidth_mbit", self.bandwidth_mbit)
        _check_number("rtt_ms", self.rtt_ms)
        if not 0 < self.bandwidth_mbit <= MAX_BANDWIDTH_MBIT:
            raise ValueError(
                f"LinkSpec.bandwidth_mbit must be > 0 and <= {MAX_BANDWIDTH_MBIT:g} Mbit/s, "
                f"got {self.bandwidth_mbit!r}"
            )
        if not 0 <= self.rtt_ms <= MAX_RTT_MS:
            raise ValueError(f"LinkSpec.rtt_ms must be >= 0 and <= {MAX_RTT_MS:g} ms, got {self.rtt_ms!r}")

    @property
    def bandwidth_bps(self) -> float:
        """Bits per second."""
        return self.bandwidth_mbit * 1e6

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_mbit * 1e6 / 8

    @property
    def rtt_s(self) -> float:
        return self.rtt_ms / 1e3

    def __str__(self) -> str:
        return f"{self.bandwidth_mbit:g}mbit/{self.rtt_ms:g}ms"

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        return parse_link(text)


def _check_number(name: str, value: object) -> None:
    # bool is an int subclass; LinkSpec(True, 5) is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"LinkSpec.{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"LinkSpec.{name} must be finite, got {value!r}")


def parse_link(text: str) -> LinkSpec:
    """Parse ``"<bandwidth><unit>/<rtt><unit>"``: ``"100mbit/100ms"``, ``"1gbit/20ms"``, ``"500kbit/0.3s"``.

    Bandwidth units: bit, kbit, mbit, gbit (per second, decimal). RTT units: us, ms, s.
    """
    if not isinstance(text, str):
        raise TypeError(f"link spec must be a string like '100mbit/100ms', got {type(text).__name__}")
    m = _SPEC.match(text)
    if m is None:
        raise ValueError(
            f"bad link spec {text!r}: expected '<bandwidth><unit>/<rtt><unit>', e.g. '100mbit/100ms'"
        )
    bw_text, bw_unit, rtt_text, rtt_unit = m.groups()
    bw_scale = _BANDWIDTH_UNITS.get(bw_unit.lower())
    if bw_scale is None:
        raise ValueError(
            f"bad link spec {text!r}: unknown bandwidth unit {bw_unit!r} "
            f"(use one of {', '.join(_BANDWIDTH_UNITS)})"
        )
    rtt_scale = _TIME_UNITS.get(rtt_unit.lower())
    if rtt_scale is None:
        raise ValueError(
            f"bad link spec {text!r}: unknown RTT unit {rtt_unit!r} (use one of {', '.join(_TIME_UNITS)})"
        )
    try:
        bandwidth, rtt = float(bw_text), float(rtt_text)
    except ValueError:
        raise ValueError(f"bad link spec {text!r}: {bw_text!r} or {rtt_text!r} is not a number") from None
    try:
        return LinkSpec(bandwidth * bw_scale, rtt * rtt_scale)
    except ValueError as e:
        raise ValueError(f"bad link spec {text!r}: {e}") from None
