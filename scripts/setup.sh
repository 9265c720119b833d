#!/usr/bin/env bash
# One-time set-up on a fresh machine: virtual environment, pinned dependencies (torch first, so
# the CPU build on this machine is used), the package itself, and the embedded demo corpus.
# Safe to re-run: every step is a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev,downstream]"
.venv/bin/cptrain data fetch-demo
