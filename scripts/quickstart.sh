#!/usr/bin/env bash
# Set up, start the default stack (two agents and the broker with the default bridge),
# send one question in each mode (c2c, t2t, solo), print the answers and timings, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh server
. .venv/bin/activate
exec cachetalk up --demo "$@"
