#!/usr/bin/env bash
# The rule's two runs, one after the other (2 CPU cores: never two torch jobs at once).
# Re-running it continues where it stopped: finished steps are skipped, stage 1 resumes from last.pt.
# usage: bash models/protocol/r18slim_procedure/run.sh HC18_DIR RUNS_DIR
set -euo pipefail
hc18=$1; runs=$2
fhc=.venv/bin/fetalhc
stage1() {  # $1: run folder, rest: extra train args
    local out=$1; shift
    local resume=(); [ -f "$out/last.pt" ] && resume=(--resume)
    [ -f "$out/done" ] || { $fhc train --hc18 "$hc18" --out "$out" --config resnet18_slim_fpn --epochs 12 \
        --val-fraction 0 --threads 2 "${resume[@]}" "$@" && touch "$out/done"; }
}
stage2() {  # $1: run folder, rest: extra args
    local out=$1; shift
    local resume=(); [ -f "$out/two_stage.pt.work/refiner_last.pt" ] && resume=(--resume)
    [ -f "$out/two_stage.pt" ] || $fhc train-refiner --hc18 "$hc18" --model "$out/best.pt" \
        --out "$out/two_stage.pt" --iters 3000 --from-scratch --threads 2 "${resume[@]}" "$@"
}
date -u +"A stage 1 start %H:%M"; stage1 "$runs/r18dev645" --protocol
date -u +"A stage 2 start %H:%M"; stage2 "$runs/r18dev645" --protocol
$fhc export-model "$runs/r18dev645/two_stage.pt" "$runs/r18dev645/fetalhc_r18dev645.pt"
date -u +"A protocol start %H:%M"
[ -f models/protocol/r18slim_procedure/protocol_table.md ] || $fhc protocol "$hc18" \
    --model "$runs/r18dev645/fetalhc_r18dev645.pt" --out models/protocol/r18slim_procedure --worst 6
date -u +"B stage 1 start %H:%M"; stage1 "$runs/r18all798"
date -u +"B stage 2 start %H:%M"; stage2 "$runs/r18all798"
$fhc export-model "$runs/r18all798/two_stage.pt" "$runs/r18all798/fetalhc_r18all798.pt"
date -u +"done %H:%M"
