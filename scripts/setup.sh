#!/usr/bin/env bash
# Create .venv with the CPU build of torch and cachetalk installed in editable mode,
# then fetch and convert the two default models into the local cache.
# Usage: scripts/setup.sh [EXTRAS]   (default extras: server)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[${extras}]"
cachetalk models fetch
