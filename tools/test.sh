#!/usr/bin/env bash
# Set up .venv and run every test: the notebooks' own (nbdev-test) and the integration tests in tests/ (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/nbdev-test --n-workers 2
.venv/bin/python -m pytest tests
