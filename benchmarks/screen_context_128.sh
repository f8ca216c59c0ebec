#!/usr/bin/env bash
# Screen, 128 px: the self-attention's hidden window (context_radius) against the paper's unmasked layer, on every
# shared dataset, with the learning gain (step 1 against 250 and 1000 steps, same scoring, same seed).
#   bash benchmarks/screen_context_128.sh DATASETS_DIR [SEEDS...]      # from the repository root; default seed 0
# Rows: results/screen/context_128/r<radius>/rows.jsonl; summary: screen_report.py over those folders.
set -euo pipefail
DATASETS=${1:?usage: screen_context_128.sh DATASETS_DIR [SEEDS...]}
shift
SEEDS=("${@:-0}")
[ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0)
DATA=(--data "battery_weld=anomalib_fod/data:battery_weld"
      --data "bottle=$DATASETS/mvtec_ad:bottle"
      --data "screw=$DATASETS/mvtec_ad:screw"
      --data "bsdata_pitting=$DATASETS:bsdata_pitting"
      --data "piped_paper_tl=$DATASETS:piped_paper_tl")
COMMON=(--image-size 128 128 --batch 1 --steps 1,250,1000
        --candidates cos maha_r maha_pc maha_blend feat_maha)
export OMP_NUM_THREADS=1
for radius in none 1 2 3; do
    setting=()
    [ "$radius" = none ] || setting=(--set "context_radius=$radius")
    out=results/screen/context_128/r$radius
    mkdir -p "$out"
    python benchmarks/screen.py "${DATA[@]}" "${COMMON[@]}" "${setting[@]}" --seeds "${SEEDS[@]}" --out "$out" \
        >> "$out.log" 2>&1
done
