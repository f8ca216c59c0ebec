#!/usr/bin/env bash
# Issue 17, screening stage: FOD's current recipe at batch 1 and batch 4 on every shared dataset, 3 seeds,
# 128 px, every scoring candidate of screen.py scored at four step counts, raw weights and their EMA.
#   bash benchmarks/screen_128.sh /path/to/shared/datasets      # from the repository root
# Each configuration is one process on one thread (run both at once on a 2-core machine); a stopped run
# resumes with the (dataset, seed) pairs it has not finished. Summary: python benchmarks/screen_report.py.
set -euo pipefail
DATASETS=${1:?usage: screen_128.sh DATASETS_DIR}
DATA=(--data "battery_weld=anomalib_fod/data:battery_weld"
      --data "bottle=$DATASETS/mvtec_ad:bottle"
      --data "screw=$DATASETS/mvtec_ad:screw"
      --data "bsdata_pitting=$DATASETS:bsdata_pitting")
export OMP_NUM_THREADS=1
python benchmarks/screen.py "${DATA[@]}" --image-size 128 128 --seeds 0 1 2 --batch 1 \
    --steps 250,500,1000,2000 --ema 0.995 --out results/screen/b1_128 > results/screen/b1_128.log 2>&1 &
python benchmarks/screen.py "${DATA[@]}" --image-size 128 128 --seeds 0 1 2 --batch 4 \
    --steps 125,250,500,1000 --ema 0.99 --out results/screen/b4_128 > results/screen/b4_128.log 2>&1 &
wait
