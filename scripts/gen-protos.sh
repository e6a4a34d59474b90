#!/usr/bin/env bash
# Regenerate the Python code of every proto in protos/moe/v1 (committed; tests/test_protos.py
# fails when it is stale). Run from anywhere: `scripts/gen-protos.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos protos/moe/v1/*.proto
