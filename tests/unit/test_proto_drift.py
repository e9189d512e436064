"""The committed protobuf modules must be exactly what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_match_the_proto_files() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_check_notices_a_changed_proto(tmp_path: Path) -> None:
    """Regenerate from an edited copy of the tree: the check must fail."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    (copy / "scripts" / "gen_proto.py").write_text((ROOT / "scripts" / "gen_proto.py").read_text())
    subprocess.run(["cp", "-r", str(ROOT / "proto"), str(copy / "proto")], check=True)
    (copy / "src" / "antorcha").mkdir(parents=True)
    subprocess.run(
        ["cp", "-r", str(ROOT / "src" / "antorcha" / "proto"), str(copy / "src" / "antorcha")], check=True
    )
    proto = copy / "proto" / "antorcha" / "v1" / "coordinator.proto"
    proto.write_text(
        proto.read_text().replace("message LeaveResponse {}", "message LeaveResponse { bool ok = 1; }")
    )
    result = subprocess.run(
        [sys.executable, str(copy / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "coordinator_pb2" in result.stdout
