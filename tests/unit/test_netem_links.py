"""LinkSpec validation and the ``"100mbit/100ms"`` text form."""

from __future__ import annotations

import math

import pytest

from antorcha.netem.lab import tbf_args
from antorcha.netem.links import LinkSpec, parse_link


@pytest.mark.parametrize(
    ("text", "mbit", "ms"),
    [
        ("100mbit/100ms", 100.0, 100.0),
        ("1gbit/20ms", 1000.0, 20.0),
        ("500kbit/0.3s", 0.5, 300.0),
        (" 2.5 Mbit / 250us ", 2.5, 0.25),
        ("10MBIT/0ms", 10.0, 0.0),
        ("8000000bit/1s", 8.0, 1000.0),
    ],
)
def test_parse_accepts_units(text: str, mbit: float, ms: float) -> None:
    spec = parse_link(text)
    assert spec.bandwidth_mbit == pytest.approx(mbit)
    assert spec.rtt_ms == pytest.approx(ms)
    assert LinkSpec.parse(text) == spec


def test_str_round_trips_and_derived_units() -> None:
    spec = LinkSpec(100, 80)
    assert str(spec) == "100mbit/80ms"
    assert parse_link(str(spec)) == spec
    assert spec.bandwidth_bps == 100e6
    assert spec.bytes_per_s == 12.5e6
    assert spec.rtt_s == pytest.approx(0.08)


def test_spec_is_frozen_and_hashable() -> None:
    spec = LinkSpec(50, 10)
    with pytest.raises(AttributeError):
        spec.rtt_ms = 5  # type: ignore[misc]
    assert {spec: 1}[LinkSpec(50.0, 10.0)] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100mbit", "expected '<bandwidth><unit>/<rtt><unit>'"),
        ("100/100ms", "expected"),
        ("fast/100ms", "expected"),
        ("100mbps/100ms", "unknown bandwidth unit 'mbps'"),
        ("100mbit/100min", "unknown RTT unit 'min'"),
        ("0mbit/10ms", "bandwidth_mbit must be > 0"),
        ("1.2.3mbit/10ms", "is not a number"),
        ("2000000gbit/10ms", "bandwidth_mbit must be > 0 and <="),
        ("10mbit/100s", "rtt_ms must be >= 0 and <="),
    ],
)
def test_parse_refuses_with_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad link spec") as err:
        parse_link(text)
    assert message in str(err.value)


def test_parse_needs_a_string() -> None:
    with pytest.raises(TypeError, match="must be a string"):
        parse_link(100)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bandwidth", "rtt", "error", "message"),
    [
        (0, 10, ValueError, "bandwidth_mbit must be > 0"),
        (-5, 10, ValueError, "bandwidth_mbit must be > 0"),
        (10, -1, ValueError, "rtt_ms must be >= 0"),
        (math.inf, 10, ValueError, "bandwidth_mbit must be finite"),
        (10, math.nan, ValueError, "rtt_ms must be finite"),
        ("100", 10, TypeError, "bandwidth_mbit must be a number"),
        (True, 10, TypeError, "bandwidth_mbit must be a number"),
        (10, None, TypeError, "rtt_ms must be a number"),
    ],
)
def test_linkspec_validates(bandwidth: object, rtt: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        LinkSpec(bandwidth, rtt)  # type: ignore[arg-type]


def test_tbf_arguments_follow_the_rate() -> None:
    slow = tbf_args(LinkSpec(10, 0))
    assert slow[:3] == ["tbf", "rate", "10000000bit"]
    burst, limit = int(slow[slow.index("burst") + 1]), int(slow[slow.index("limit") + 1])
    # Never below a 64 KiB GSO packet, and the queue always holds more than one burst.
    assert burst >= 64 * 1024
    assert limit > burst
    fast = tbf_args(LinkSpec(10_000, 0))
    assert int(fast[fast.index("burst") + 1]) > burst
