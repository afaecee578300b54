#!/usr/bin/env bash
# Create .venv in the repo root and install FetalHC with the given extras (e.g. "server,slicer,test").
# Idempotent: a second run only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    # A new .venv takes about 9 GB (torch's CUDA build alone 5.5 GB): say so before pip fails half-way.
    free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
    if [ "${free_mb:-0}" -lt 10000 ]; then
        echo "warning: only ${free_mb} MB free on $(df -P . | awk 'NR == 2 {print $6}'); the install needs about 9 GB" >&2
    fi
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=23.2"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/python -m pip install --quiet -e "$spec"
