#!/usr/bin/env bash
# Fresh machine -> HC of a shipped HC18 sample image, with an overlay PNG in demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fetalhc measure sample-data/hc18/507_HC.png \
    --pixel-csv sample-data/hc18/training_set_pixel_size_and_HC.csv --out demo-out "$@"
echo "overlay: demo-out/507_HC_overlay.png   (expected HC from the HC18 CSV: 166.73 mm)"
