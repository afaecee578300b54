#!/usr/bin/env bash
# .venv-slicer: the Python packages today's 3D Slicer (5.8+) ships, for testing the Slicer module under
# them -- numpy 2.4, pydicom 3.0, VTK + MRML (slicer-core), no OpenCV, no torch. fetalhc is not installed
# here: the tests put lib/ on PYTHONPATH, as the module finds lib/ (or its vendored copy) in Slicer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv-slicer/bin/python ]; then
    "$PY" -m venv .venv-slicer
fi
.venv-slicer/bin/python -m pip install --quiet --upgrade "pip>=23.2"
.venv-slicer/bin/python -m pip install --quiet numpy==2.4.6 pydicom==3.0.2 slicer-core==5.13.31053.0 "pytest>=7"
