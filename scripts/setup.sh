#!/usr/bin/env bash
# Create .venv with the CPU torch wheel and jfexport installed editable (with test extras).
# torch goes first and stays pinned: any looser spec pulls the newest CUDA build (GBs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
