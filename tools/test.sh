#!/usr/bin/env bash
# Set up .venv and run every test: the notebooks' own (nbdev-test) and the integration tests in tests/ (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
OMP_NUM_THREADS=1 .venv/bin/nbdev-test --n-workers 2   # one thread per notebook: two workers share the two cores
.venv/bin/python -m pytest tests
