#!/usr/bin/env bash
# Create .venv and install cerebrium-ft with its dev extra. PyTorch goes first, so that pip keeps it
# instead of pulling a multi-GB CUDA build: TORCH_SPEC (default torch==2.13.0, a CPU build here) picks it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
