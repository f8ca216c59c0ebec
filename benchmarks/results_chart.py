"""The harness's results chart (image and pixel AUROC per dataset, fit time against image AUROC) from result rows.

The published comparison is kept as one JSON line per cell (``benchmarks/results/*.jsonl``: dataset, model, seed,
exact metrics, fit time) rather than as run folders; this draws the chart ``anomalib-fod benchmark`` draws for a
run folder (``RUN/results.png``) from such rows, mean and spread over the seeds.

    python benchmarks/results_chart.py benchmarks/results/shared_datasets_256_2026-12-07.jsonl \\
        --models "Fod,Patchcore1pct,Padim,Cdo" --out benchmarks/figures/shared_datasets_256.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anomalib_fod.benchmark.report import aggregate, chart


def summary_of(rows_file: Path, models: list[str], datasets: list[str] | None = None) -> list[dict]:
    """Per (dataset, model) means and spreads of ``rows_file``'s rows, models in the order given."""
    rows = [{**row, "status": "ok"} for row in map(json.loads, rows_file.read_text().splitlines())
            if row["model"] in models and (datasets is None or row["dataset"] in datasets)]
    missing = sorted(set(models) - {row["model"] for row in rows})
    if missing:
        msg = f"{rows_file} has no rows of {missing}"
        raise SystemExit(msg)
    order = datasets or list(dict.fromkeys(row["dataset"] for row in rows))
    rows.sort(key=lambda row: (models.index(row["model"]), order.index(row["dataset"]), row["seed"]))
    return aggregate(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, help="JSON lines with dataset, model, seed, image_auroc, pixel_auroc, fit_s")
    parser.add_argument("--models", required=True, help="comma-separated model names, in the legend's order")
    parser.add_argument("--datasets", help="comma-separated dataset names (default: every one, in file order)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    datasets = args.datasets.split(",") if args.datasets else None
    chart(args.out, summary_of(args.rows, args.models.split(","), datasets))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
