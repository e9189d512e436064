"""Regenerate the committed protobuf modules under src/antorcha/proto from proto/antorcha/v1.

Run with `make proto`. Output goes to a temporary folder first, then replaces the committed files, so a
failed run never leaves half-written modules. `--check` compares instead of writing (used by a test).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc
from importlib.resources import files

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
OUT_DIR = ROOT / "src" / "antorcha" / "proto"
PACKAGE_DIR = Path("antorcha") / "v1"


def generate(into: Path) -> list[Path]:
    """Compile every .proto into `into`, rewriting imports so they resolve inside antorcha.proto."""
    sources = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    include = str(files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={into}", f"--pyi_out={into}",
            f"--grpc_python_out={into}", *(str(s.relative_to(PROTO_ROOT)) for s in sources)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((into / PACKAGE_DIR).glob("*.py*"))
    for path in generated:
        text = path.read_text()
        # protoc writes absolute imports rooted at the proto path; ours live under antorcha.proto.
        text = text.replace("from antorcha.v1 import", "from antorcha.proto.antorcha.v1 import")
        path.write_text(text)
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed modules differ")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generated = generate(tmp_path)
        target = OUT_DIR / PACKAGE_DIR
        if args.check:
            stale = [p.name for p in generated if not (target / p.name).exists()
                     or not filecmp.cmp(p, target / p.name, shallow=False)]
            extra = sorted({p.name for p in target.glob("*_pb2*.py*")} - {p.name for p in generated})
            if stale or extra:
                print(f"generated protobuf modules are stale: {stale + extra}; run `make proto`")
                return 1
            return 0
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*_pb2*.py*"):
            old.unlink()
        for path in generated:
            shutil.copy(path, target / path.name)
        for pkg in (OUT_DIR / "antorcha", target):
            (pkg / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
