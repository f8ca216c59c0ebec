#!/usr/bin/env bash
# Issue 17, confirmation of the scoring candidates at 256 px: batch 1 (the 128 px screen showed batch 1 ahead of
# batch 4 at equal images seen), every shared dataset, checkpoints kept for re-scoring.
#   bash benchmarks/screen_256.sh /path/to/shared/datasets [SEEDS...]      # from the repository root
set -euo pipefail
DATASETS=${1:?usage: screen_256.sh DATASETS_DIR [SEEDS...]}; shift
SEEDS=("${@:-0}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p results/screen
python benchmarks/screen.py \
    --data "battery_weld=anomalib_fod/data:battery_weld" --data "bottle=$DATASETS/mvtec_ad:bottle" \
    --data "bsdata_pitting=$DATASETS:bsdata_pitting" --data "screw=$DATASETS/mvtec_ad:screw" \
    --image-size 256 256 --seeds "${SEEDS[@]}" --batch 1 --steps 250,500,1000 --save-checkpoints \
    --candidates paper cos cos_div nmse_c nmse_pc maha_r maha_pc maha_z maha_z_klz maha_z_klz_half klz klr feat_maha \
    --out results/screen/b1_256 > "results/screen/b1_256_seeds_${SEEDS[*]// /_}.log" 2>&1
