#!/usr/bin/env bash
# Set up .venv and run the main job end to end, offline, on the embedded tiny model; output in demo-output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/cerebrium-ft demo --workdir "${1:-demo-output}"
