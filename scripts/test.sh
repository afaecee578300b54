#!/usr/bin/env bash
# Fresh machine -> full test suite (core, MONAI Label app, Slicer logic, sample apps).
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
