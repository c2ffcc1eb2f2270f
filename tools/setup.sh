#!/usr/bin/env bash
# Create .venv and install cerebrium-ft with its dev extra. PyTorch goes first, so that pip keeps it instead of pulling
# another build: TORCH_SPEC (default torch==2.13.0) picks the version, TORCH_INDEX_URL the index it comes from.
# On this project's machines torch==2.13.0 is a CPU build on local disk; on a stock machine PyPI's torch==2.13.0 is the
# multi-GB CUDA build, and TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes PyTorch's CPU-only wheel instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
