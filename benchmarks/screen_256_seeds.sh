#!/usr/bin/env bash
# Issue 17, confirmation at 256 px of the 128 px screen's winner (the whitened residual, maha_r) over 3 seeds,
# next to the paper's score and the per-position covariance option (maha_pc, Fod(residual_covariance="position"))
# from the same trained weights. Batch 1, 250 steps: maha_r was flat from 250 to 1000 steps at 128 px on every
# dataset. One process per dataset, one thread each; a stopped run resumes the (dataset, seed) pairs it has not
# finished.
#   bash benchmarks/screen_256_seeds.sh /path/to/shared/datasets                   # battery_weld, bsdata_pitting
#   bash benchmarks/screen_256_seeds.sh /path/to/shared/datasets bottle screw      # the MVTec AD categories
#   bash benchmarks/screen_256_seeds.sh /path/to/shared/datasets --set num_layers=1 battery_weld  # a Fod setting;
#       its results go to results/screen/b1_256_<dataset>_num_layers1
# Baselines: anomalib-fod benchmark --config benchmarks/issue17.yaml --models Padim Patchcore1pct --datasets ...
# Summary: python benchmarks/screen_report.py results/screen/b1_256_battery results/screen/b1_256_bsdata \
#              --steps 250 --weights raw --baselines results/benchmarks/issue17
set -euo pipefail
DATASETS=${1:?usage: screen_256_seeds.sh DATASETS_DIR [--set KEY=VALUE ...] [battery_weld|bsdata_pitting|bottle|screw ...]}
shift
SETTINGS=()
SUFFIX=
while [ "${1:-}" = --set ]; do
    SETTINGS+=(--set "${2:?--set needs KEY=VALUE}")
    SUFFIX="${SUFFIX}_${2//=/}"
    shift 2
done
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(battery_weld bsdata_pitting)
COMMON=(--image-size 256 256 --batch 1 --steps 250 --seeds 0 1 2
        --candidates paper cos maha_r maha_pc maha_z_klz feat_maha ${SETTINGS[@]+"${SETTINGS[@]}"})
export OMP_NUM_THREADS=1
mkdir -p results/screen
for name in "${NAMES[@]}"; do
    case $name in
        battery_weld) data="battery_weld=anomalib_fod/data:battery_weld"; out=b1_256_battery ;;
        bsdata_pitting) data="bsdata_pitting=$DATASETS:bsdata_pitting"; out=b1_256_bsdata ;;
        bottle|screw) data="$name=$DATASETS/mvtec_ad:$name"; out=b1_256_$name ;;
        *) echo "unknown dataset $name" >&2; exit 2 ;;
    esac
    out="$out$SUFFIX"
    python benchmarks/screen.py --data "$data" "${COMMON[@]}" --out "results/screen/$out" \
        > "results/screen/$out.log" 2>&1 &
done
wait
