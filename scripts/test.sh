#!/usr/bin/env bash
# Fresh machine -> full test suite (core, MONAI Label app, Slicer logic, sample apps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh server,slicer,test
# A real PACS for the DICOMweb tests (Debian packages); skipped quietly where apt is not ours to use.
if ! command -v Orthanc >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb) \
        >/dev/null 2>&1 || echo "note: could not install orthanc; the PACS tests will be skipped"
fi
export MONAI_LABEL_TRACKING_ENABLED=false
export PYTHONPATH="${PYTHONPATH:-}"
.venv/bin/python -m pytest -q "$@"
