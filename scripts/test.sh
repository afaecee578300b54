#!/usr/bin/env bash
# Fresh machine -> full test suite (core, MONAI Label app, Slicer logic, sample apps), then the Slicer
# module's tests again under the dependency set of today's 3D Slicer (5.8+: numpy 2.4, pydicom 3.0, no
# OpenCV, no torch) in a separate venv, .venv-slicer, against the same real server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh server,slicer,test
# A real PACS for the DICOMweb tests and independent DICOM validators (dciodvfy, dsrdump) for the SEG/SR
# tests (Debian packages); skipped quietly where apt is not ours to use.
need=""
command -v Orthanc >/dev/null 2>&1 || need="$need orthanc orthanc-dicomweb"
command -v dciodvfy >/dev/null 2>&1 || need="$need dicom3tools"
command -v dsrdump >/dev/null 2>&1 || need="$need dcmtk"
if [ -n "$need" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need) \
        >/dev/null 2>&1 || echo "note: could not install$need; the tests that need them will fail or skip"
fi
export MONAI_LABEL_TRACKING_ENABLED=false
export PYTHONPATH="${PYTHONPATH:-}"
.venv/bin/python -m pytest -q "$@"
if [ "$#" -eq 0 ]; then
    bash scripts/slicer_venv.sh
    echo "--- Slicer module under Slicer's dependency set (.venv-slicer)"
    FETALHC_SLICER_DEPS=1 PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}" \
        .venv-slicer/bin/python -m pytest -q tests/test_geometry.py tests/test_result.py tests/test_clinical.py \
            tests/test_slicer_logic.py tests/test_slicer_server.py
fi
