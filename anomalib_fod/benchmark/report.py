"""Benchmark report: results.csv (one row per cell), results.json, results.md and results.png.

Cells with a ``test_curve`` also get a convergence table in results.md and ``curves.png``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import BenchmarkConfig
from .jsonio import write_json

# (column key in a flattened cell row, Markdown header, decimals)
QUALITY_COLUMNS = (
    ("image_auroc", "image AUROC", 4),
    ("pixel_auroc", "pixel AUROC", 4),
    ("pixel_aupro", "AUPRO@0.3", 4),
    ("image_f1_max", "image F1-max", 4),
)
COST_COLUMNS = (
    ("fit_s", "fit s", 1),
    ("epochs", "epochs", 0),
    ("train_img_s", "train img/s", 1),
    ("infer_img_s", "infer img/s", 1),
    ("openvino_ms", "OV ms (b=1)", 1),
    ("peak_rss_mb", "peak RSS MiB", 0),
    ("peak_gpu_mb", "peak GPU MiB", 0),
    ("checkpoint_mb", "ckpt MiB", 1),
    ("export_mb", "OV MiB", 1),
)
METHOD_NOTES = """\
- Exact metrics use the raw predictions of `Engine.predict` (post-processor normalisation off):
  image AUROC and image F1-max (best threshold, chosen on the test set) with anomalib's `AUROC` and `F1Max` on
  image scores, pixel AUROC with anomalib's `AUROC` on every pixel (every distinct score a threshold, see
  `anomalib_fod/evaluation.py`), AUPRO = area under the per-region-overlap vs. global-FPR
  curve up to FPR 0.3 divided by 0.3 (8-connected GT regions, maps min-max scaled over the test set).
  `anomalib ...` columns are anomalib's own test metrics on post-processed (normalised, clamped) scores.
- Validation uses `val_split_mode: same_as_test` only so that anomalib's post-processor can compute its
  thresholds and min-max normalisation (which affect the `anomalib ...` columns only). The test set never
  selects a model, an epoch or a hyper-parameter: every model trains for its configured epochs and the last
  state is evaluated.
- Every model uses the same datamodule, image size, backbone, layers and ImageNet weights.
- fit s: `Engine.fit` wall time (training + one validation pass + memory-bank/coreset building where the model
  has one). train img/s = training images x epochs / fit s. infer img/s: the model's full forward
  (pre-processor, model, post-processor) in eval mode under `no_grad`, on test images already resized to the
  input size, after one warm-up batch. OV ms: median latency of the OpenVINO FP32 IR on the CPU, batch 1.
  peak RSS: `getrusage` maximum resident set of the cell's process (fit, test, predict, timing, export).
- Values are mean ± sample std over seeds where there is more than one seed."""


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """One cell record -> one flat row (metrics, anomalib metrics as ``anomalib_<name>``, costs)."""
    row: dict[str, Any] = {key: result.get(key) for key in ("dataset", "model", "seed", "status")}
    row.update(result.get("metrics", {}))
    row.update({f"anomalib_{k}": v for k, v in result.get("anomalib_metrics", {}).items()})
    row.update(result.get("cost", {}))
    row["rss_scope"] = result.get("rss_scope")
    resumed = result.get("resumed") or {}
    row["resumed_after_epochs"] = resumed.get("epochs_done")
    row["resumed_adopted"] = resumed.get("adopted")
    row["error"] = result.get("error")
    row["finished"] = result.get("finished")
    return row


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of every numeric column, per (dataset, model), in run order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault((row["dataset"], row["model"]), []).append(row)
    summary = []
    for (dataset, model), members in groups.items():
        entry: dict[str, Any] = {"dataset": dataset, "model": model, "seeds": [m["seed"] for m in members]}
        keys = dict.fromkeys(k for m in members for k in m)
        for key in keys:
            values = [v for v in (_number(m.get(key)) for m in members) if v is not None]
            if not values or key == "seed":
                continue
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def _cell(entry: dict[str, Any], key: str, decimals: int) -> str:
    value = entry.get(key)
    if value is None:
        return "–"
    text = f"{value:.{decimals}f}"
    if len(entry["seeds"]) > 1:
        text += f" ± {entry.get(f'{key}_std', 0.0):.{decimals}f}"
    return text


def anomalib_metric_keys(summary: Sequence[dict[str, Any]]) -> list[str]:
    """``anomalib_*`` metric columns present in any summary row (first-seen order)."""
    keys = dict.fromkeys(k for e in summary for k in e if k.startswith("anomalib_") and not k.endswith("_std"))
    return list(keys)


def markdown(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], environment: dict[str, Any]) -> str:
    """The Markdown report: environment, one table row per dataset x model, failures, method notes."""
    anomalib_keys = anomalib_metric_keys(summary)
    columns = [
        *QUALITY_COLUMNS,
        *[(k, "anomalib " + k.removeprefix("anomalib_").replace("_", " "), 4) for k in anomalib_keys],
        *COST_COLUMNS,
    ]
    versions = environment.get("versions", {})
    git = environment.get("git", {})
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    device = environment.get("gpu") or f"{environment.get('cpu')} ({environment.get('cpu_count')} logical CPUs)"
    lines = [
        "# Benchmark results",
        "",
        f"- date: {environment.get('date')}; device: {device}; torch threads: {environment.get('torch_threads')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- git commit: {commit}",
        "",
        "| dataset | model | seeds | " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "---|" * (3 + len(columns)),
    ]
    for entry in summary:
        seeds = ",".join(str(s) for s in entry["seeds"])
        cells = [_cell(entry, key, decimals) for key, _, decimals in columns]
        lines.append(f"| {entry['dataset']} | {entry['model']} | {seeds} | " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [f"- {r['dataset']} / {r['model']} / seed {r['seed']}: {r.get('error')}" for r in failed]
    resumed = [r for r in rows if r.get("status") == "ok" and r.get("resumed_after_epochs") is not None]
    if resumed:
        lines += ["", "## Resumed cells", ""]
        lines += [
            f"- {r['dataset']} / {r['model']} / seed {r['seed']}: resumed after {r['resumed_after_epochs']} "
            f"epoch(s); "
            + (
                "adopted a checkpoint written before cells were resumable: fit time unknown, and the "
                "peak RSS covers evaluation only"
                if r.get("resumed_adopted")
                else "fit s adds up every process's fit time; peak RSS is the last process's"
            )
            for r in resumed
        ]
    export_errors = [r for r in rows if r.get("status") == "ok" and r.get("openvino_error") not in (None, "disabled")]
    if export_errors:
        lines += ["", "## OpenVINO export/latency errors", ""]
        lines += [f"- {r['dataset']} / {r['model']} / seed {r['seed']}: {r['openvino_error']}" for r in export_errors]
    scopes = {r.get("rss_scope") for r in rows if r.get("status") == "ok"}
    lines += ["", "## Method", "", METHOD_NOTES]
    if "whole harness process" in scopes:
        lines.append("- Cells ran in one process (`isolate_cells: false`): peak RSS includes all earlier cells.")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """All cell rows, with the union of their columns."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def chart(path: Path, summary: Sequence[dict[str, Any]]) -> None:
    """Image/pixel AUROC bars per dataset grouped by model, and fit time vs image AUROC."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    datasets = list(dict.fromkeys(e["dataset"] for e in summary))
    models = list(dict.fromkeys(e["model"] for e in summary))
    lookup = {(e["dataset"], e["model"]): e for e in summary}
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(models))
    panels = ((axes[0], "image_auroc", "image AUROC (exact)"), (axes[1], "pixel_auroc", "pixel AUROC (exact)"))
    for axis, key, title in panels:
        for j, model in enumerate(models):
            xs, ys, errors = [], [], []
            for i, dataset in enumerate(datasets):
                entry = lookup.get((dataset, model))
                if entry is not None and entry.get(key) is not None:
                    xs.append(i + (j - (len(models) - 1) / 2) * width)
                    ys.append(entry[key])
                    errors.append(entry.get(f"{key}_std", 0.0))
            yerr = errors if any(errors) else None
            axis.bar(xs, ys, width, yerr=yerr, label=model, color=colours[model], capsize=2)
        # Dataset names longer than a group of bars would run into each other: slant them.
        slant = max(map(len, datasets), default=0) > 10  # noqa: PLR2004
        axis.set_xticks(range(len(datasets)), datasets, rotation=20 if slant else 0, ha="right" if slant else "center")
        low = min((lookup[k].get(key) or 1.0) for k in lookup)
        axis.set_ylim(0.0 if low < 0.55 else 0.5, 1.0)  # noqa: PLR2004 - show chance level when it matters
        axis.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    # One legend for both bar panels, below them: inside an axis it hides the tallest bars.
    figure.legend(
        *axes[0].get_legend_handles_labels(),
        loc="lower center",
        bbox_to_anchor=(1 / 3, 0.0),
        ncol=min(len(models), 6),
        fontsize="small",
    )
    markers = "osD^v<>ph*"
    for entry in summary:
        if entry.get("fit_s") is None or entry.get("image_auroc") is None:
            continue
        axes[2].scatter(
            entry["fit_s"],
            entry["image_auroc"],
            color=colours[entry["model"]],
            marker=markers[datasets.index(entry["dataset"]) % len(markers)],
            s=60,
        )
    for i, dataset in enumerate(datasets):
        axes[2].scatter([], [], color="grey", marker=markers[i % len(markers)], label=dataset)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("fit time (s, log scale)")
    axes[2].set_ylabel("image AUROC (exact)")
    axes[2].set_title("cost vs. quality (colour: model, marker: dataset)")
    axes[2].grid(alpha=0.3)
    if datasets:
        axes[2].legend(fontsize="small")
    figure.tight_layout(rect=(0.0, 0.08, 1.0, 1.0))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def curve_markdown(results: Sequence[dict[str, Any]]) -> str:
    """Per-epoch test metrics of the cells that recorded a curve (empty string if none did)."""
    lines = []
    for result in results:
        curve = result.get("test_curve") or {}
        if not curve.get("points"):
            continue
        lines += [
            "",
            f"### Convergence: {result['dataset']} / {result['model']} / seed {result['seed']}",
            "",
            "Test metrics after every epoch, for reporting only (the cell evaluates its last epoch; pixel metrics",
            f"here at the model's output size). Evaluation time, excluded from fit s: {curve['seconds']:.0f} s.",
            "",
            "| epoch | image AUROC | pixel AUROC | AUPRO@0.3 |",
            "|---|---|---|---|",
        ]
        for point in curve["points"]:
            values = [point.get(key) for key in ("image_auroc", "pixel_auroc", "pixel_aupro")]
            cells = ["–" if _number(v) is None else f"{v:.4f}" for v in values]
            lines.append(f"| {point['epoch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if lines else ""


def curve_chart(path: Path, results: Sequence[dict[str, Any]]) -> bool:
    """Image and pixel AUROC vs. epoch for every cell with a curve; ``False`` when there is none."""
    curves = [r for r in results if (r.get("test_curve") or {}).get("points")]
    if not curves:
        return False
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for result in curves:
        points = result["test_curve"]["points"]
        label = f"{result['dataset']} / {result['model']} / seed {result['seed']}"
        epochs = [p["epoch"] for p in points]
        for axis, key in zip(axes, ("image_auroc", "pixel_auroc"), strict=True):
            axis.plot(epochs, [p[key] for p in points], marker="o", label=label)
    for axis, title in zip(axes, ("image AUROC (exact) vs. epoch", "pixel AUROC (exact) vs. epoch"), strict=True):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(
    run_dir: Path,
    results: Sequence[dict[str, Any]],
    config: BenchmarkConfig,
    environment: dict[str, Any],
) -> list[Path]:
    """Write results.csv, results.json, results.md, results.png (and curves.png); return their paths."""
    rows = [flatten(r) for r in results]
    summary = aggregate(rows)
    paths = [run_dir / name for name in ("results.csv", "results.json", "results.md", "results.png")]
    write_csv(paths[0], rows)
    report = {"environment": environment, "config": asdict(config), "summary": summary, "cells": list(results)}
    write_json(paths[1], report)
    paths[2].write_text(markdown(summary, rows, environment) + curve_markdown(results), encoding="utf-8")
    if summary:
        chart(paths[3], summary)
    else:
        paths.pop()
    if curve_chart(run_dir / "curves.png", results):
        paths.append(run_dir / "curves.png")
    return paths
