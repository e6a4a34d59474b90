"""The committed generated code in protos/moe/v1 matches its .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "moe" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generated_names(proto: Path) -> list[str]:
    return [proto.stem + suffix for suffix in SUFFIXES]


def test_committed_generated_code_matches_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    protos = sorted(PROTO_DIR.glob("*.proto"))
    assert protos, f"no .proto files in {PROTO_DIR}"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        *[str(p) for p in protos],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"protoc failed: {done.stderr}"
    stale = []
    for proto in protos:
        for name in _generated_names(proto):
            fresh = (tmp_path / "moe" / "v1" / name).read_text()
            committed = PROTO_DIR / name
            if not committed.exists() or committed.read_text() != fresh:
                stale.append(name)
    assert not stale, f"generated code is stale, run scripts/gen-protos.sh: {', '.join(stale)}"


def test_no_generated_file_without_its_proto() -> None:
    sources = {p.stem for p in PROTO_DIR.glob("*.proto")}
    orphans = [
        p.name for p in PROTO_DIR.iterdir()
        if p.name.endswith(SUFFIXES) and p.name.split("_pb2")[0] not in sources
    ]
    assert not orphans, f"generated files whose .proto is gone: {orphans}"


def test_generated_packages_import_as_moe_v1() -> None:
    from moe.v1 import inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "moe.v1"
    assert router_pb2.DESCRIPTOR.package == "moe.v1"
    assert hasattr(inference_pb2_grpc, "InferenceStub")
    assert hasattr(router_pb2_grpc, "RouterStub")
