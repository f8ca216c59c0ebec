"""Summarise ``screen.py`` runs: mean and spread over seeds per dataset, step count, weights and candidate.

    python benchmarks/research/screen_report.py results/screen/b1_128 [--candidates paper maha_r] [--weights raw]
    python benchmarks/research/screen_report.py results/screen/b1_128_s01 results/screen/b1_128_s2 --steps 500 \
        --baselines results/benchmarks/shared_datasets_128       # with the harness's PatchCore/PaDiM cells
    python benchmarks/research/screen_report.py results/screen/blend_256_bsdata --compose maha_blend@maha_pc

Prints one Markdown table per dataset: image and pixel AUROC as ``mean ± std (n seeds)``, then the mean
over datasets of each (step, weights, candidate) row with every dataset present, and the seeds' training
time. Baseline cells of an ``anomalib-fod benchmark`` run (same datasets, finished cells only) are added
as rows with step and weights ``-``. Reporting only: the screen itself selects nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


def load(run: Path) -> tuple[list[dict], list[dict]]:
    """Scored rows and the per-(dataset, seed) completion records of a run folder."""
    rows, finals = [], []
    for line in (run / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        (finals if row.get("final") else rows).append(row)
    return rows, finals


def load_baselines(run: Path) -> list[dict]:
    """Finished harness cells as screen rows (exact metrics on raw scores, as the screen's)."""
    rows = []
    for path in sorted((run / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        if cell.get("status") != "ok":
            continue
        rows.append({"dataset": cell["dataset"], "seed": cell["seed"], "step": "-", "weights": "-",
                     "candidate": cell["model"], "fit_s": cell["cost"]["fit_s"], **cell["metrics"]})
    return rows


def composed(unique: dict[tuple, dict], names: list[str]) -> list[dict]:
    """Rows of ``MAP@IMAGE`` candidates: ``MAP``'s row with ``IMAGE``'s image AUROC from the same weights.

    Exact, not an estimate: the screen computes a candidate's image score as its own map's maximum, so a
    model that takes the map from one rule and the image score from another scores what these rows say.
    """
    rows = []
    for name in names:
        map_name, _, image_name = name.partition("@")
        if not image_name:
            msg = f"--compose expects MAP@IMAGE, got {name!r}"
            raise SystemExit(msg)
        for (dataset, seed, step, weights, candidate, settings), row in unique.items():
            image_row = unique.get((dataset, seed, step, weights, image_name, settings))
            if candidate == map_name and image_row is not None:
                rows.append({**row, "candidate": name, "image_auroc": image_row["image_auroc"]})
    return rows


def spread(values: list[float]) -> str:
    """``mean ± std (n)``; the std of one value is not shown."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f} (1)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)})"


def main(argv: list[str] | None = None) -> int:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run", type=Path, nargs="+", help="screen.py output folders (rows of the same settings are pooled)"
    )
    parser.add_argument("--steps", type=int, nargs="*", help="only these step counts")
    parser.add_argument("--baselines", type=Path, help="an anomalib-fod benchmark run folder")
    parser.add_argument("--candidates", nargs="*")
    parser.add_argument("--weights", nargs="*")
    parser.add_argument("--metric", nargs="*", default=["image_auroc", "pixel_auroc"])
    parser.add_argument(
        "--compose", nargs="*", default=[], metavar="MAP@IMAGE",
        help="rows whose pixel metrics are candidate MAP's and image AUROC candidate IMAGE's, on the same weights "
        "(Fod's image_score='position' with residual_covariance='blend' is maha_blend@maha_pc)",
    )
    args = parser.parse_args(argv)
    rows, finals = [], []
    for run in args.run:
        run_rows, run_finals = load(run)
        rows += [
            r for r in run_rows
            if (not args.steps or r["step"] in args.steps) and (not args.weights or r["weights"] in args.weights)
        ]
        finals += run_finals
    # A (dataset, seed, step, weights, candidate, settings) measured in two pooled folders (a merged copy of
    # another run) counts once, or its seed would weigh double in the mean and shrink the spread.
    unique = {
        (r["dataset"], r["seed"], r["step"], r["weights"], r["candidate"], tuple(r.get("settings") or [])): r
        for r in rows
    }
    rows = list(unique.values()) + composed(unique, args.compose)
    rows = [r for r in rows if not args.candidates or r["candidate"] in args.candidates]
    finals = list({(f["dataset"], f["seed"], f["train_seconds"]): f for f in finals}.values())
    # The filters select screen rows; baselines are always shown next to them.
    baselines = load_baselines(args.baselines) if args.baselines else []
    rows += baselines
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        # Runs with different model settings (screen.py --set) stay apart: "maha_r [num_layers=1]".
        settings = row.get("settings") or []
        candidate = row["candidate"] + (f" [{', '.join(settings)}]" if settings else "")
        key = (row["dataset"], row["step"], row["weights"], candidate)
        for metric in args.metric:
            groups[key][metric].append(row.get(metric, math.nan))
    datasets = list(dict.fromkeys(key[0] for key in groups))
    header = "| step | weights | candidate | " + " | ".join(args.metric) + " |"
    rule = "|---|---|---|" + "---|" * len(args.metric)
    for dataset in datasets:
        print(f"\n### {dataset}\n\n{header}\n{rule}")
        for key, values in groups.items():
            if key[0] == dataset:
                print(f"| {key[1]} | {key[2]} | {key[3]} | " + " | ".join(spread(values[m]) for m in args.metric) + " |")
    print(f"\n### mean over datasets (seed means; rows present on all of {', '.join(datasets)})\n\n{header}\n{rule}")
    for step, weights, candidate in dict.fromkeys(key[1:] for key in groups):
        cells = []
        for metric in args.metric:
            means = [statistics.mean(groups[(d, step, weights, candidate)][metric] or [math.nan]) for d in datasets]
            cells.append(f"{statistics.mean(means):.4f}" if all(not math.isnan(m) for m in means) else "–")
        print(f"| {step} | {weights} | {candidate} | " + " | ".join(cells) + " |")
    print("\ntraining seconds per (dataset, seed): " + ", ".join(
        f"{f['dataset']} s{f['seed']} {f['train_seconds']:.0f}" for f in finals))
    if baselines:
        print("baseline fit seconds: " + ", ".join(
            f"{b['dataset']} {b['candidate']} s{b['seed']} {b['fit_s']:.0f}" for b in baselines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
