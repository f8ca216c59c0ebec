#!/usr/bin/env bash
# Screen, 128 px: FOD's learned discrepancies (1 - cos of the reconstruction, the inter-branch KL), each in the
# training images' per-position z-units, added to the whitened residual's z-score, on every shared dataset, with
# the learning gain (step 1 against 250 and 1000 steps, same scoring, same seed); statistics at +-10 % exposure.
#   bash benchmarks/research/screen_fusion_128.sh DATASETS_DIR [SEEDS...]      # from the repository root; default seed 0
set -euo pipefail
DATASETS=${1:?usage: screen_fusion_128.sh DATASETS_DIR [SEEDS...]}
shift
SEEDS=("${@:-0}")
DATA=(--data "battery_weld=anomalib_fod/data:battery_weld"
      --data "bottle=$DATASETS/mvtec_ad:bottle"
      --data "screw=$DATASETS/mvtec_ad:screw"
      --data "bsdata_pitting=$DATASETS:bsdata_pitting"
      --data "piped_paper_tl=$DATASETS:piped_paper_tl")
export OMP_NUM_THREADS=1
out=results/screen/fusion_128
mkdir -p "$out"
python benchmarks/research/screen.py "${DATA[@]}" --image-size 128 128 --batch 1 --steps 1,250,1000 --gains 0.9 1.0 1.1 \
    --candidates cos maha_pc maha_blend feat_maha klz cos_z blend_z blend_cos_z blend_cos_z_half blend_klz \
    --seeds "${SEEDS[@]}" --out "$out" >> "$out.log" 2>&1
