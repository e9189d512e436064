"""The lab's refusals that need no root: bad nodes, and a clear reason when the host cannot run it."""

from __future__ import annotations

import pytest

from antorcha.netem import lab as lab_module
from antorcha.netem.lab import LabError, NetworkLab, _check_host
from antorcha.netem.links import LinkSpec


def test_nodes_are_validated_before_anything_is_built() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        NetworkLab({})
    with pytest.raises(ValueError, match="bad link spec 'fast'"):
        NetworkLab({"a": "fast"})
    with pytest.raises(TypeError, match="node 'a': expected a LinkSpec"):
        NetworkLab({"a": 100})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="node names must be non-empty strings"):
        NetworkLab({"": None})
    lab = NetworkLab({"a": "100mbit/100ms", "b": None})
    assert lab.links == {"a": LinkSpec(100, 100), "b": None}
    assert lab.rtt_ms("a", "b") == 50.0


def test_a_lab_that_is_not_running_says_so() -> None:
    lab = NetworkLab({"a": None})
    with pytest.raises(LabError, match="not running"):
        lab.command("a", ["true"])
    with pytest.raises(KeyError, match="no node 'z'"):
        lab.address("z")


def test_not_root_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_module.sys, "platform", "linux")
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        _check_host()


def test_missing_tools_name_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_module.sys, "platform", "linux")
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(lab_module.os, "access", lambda path, mode: False)
    with pytest.raises(LabError, match=r"`ip` not found.*install the iproute2 package"):
        _check_host()


def test_other_systems_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_module.sys, "platform", "darwin")
    with pytest.raises(LabError, match="needs Linux network namespaces"):
        _check_host()
