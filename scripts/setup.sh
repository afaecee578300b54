#!/usr/bin/env bash
# Create .venv in the repo root and install FetalHC with the given extras (e.g. "server,slicer,test").
# Idempotent: a second run only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=23.2"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/python -m pip install --quiet -e "$spec"
