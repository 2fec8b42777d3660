#!/usr/bin/env bash
# Set up with the test and benchmark extras, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "server,dev,bench"
. .venv/bin/activate
exec python -m pytest -q "$@"
