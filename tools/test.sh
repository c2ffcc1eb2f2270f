#!/usr/bin/env bash
# Set up .venv and run every test: the notebooks' own (nbdev-test) and the integration tests in tests/ (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# The JupyterLab rendering test drives Debian's Chromium (no browser download): install it where we can.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
OMP_NUM_THREADS=1 .venv/bin/nbdev-test --n-workers 2   # one thread per notebook: two workers share the two cores
.venv/bin/python tools/docs_stage.py   # the docs build's first stage (Quarto renders the rest where it is installed)
.venv/bin/python -m pytest tests --durations=25   # the slowest tests listed: the whole command must stay under about 30 minutes on 2 cores
