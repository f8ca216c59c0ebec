"""Tables and figures for the ablation study from a finished ``benchmarks/ablation*.yaml`` run.

    anomalib-fod benchmark --config benchmarks/ablation_cpu.yaml
    python benchmarks/ablation_report.py results/benchmarks/ablation_cpu --output benchmarks/ablation_cpu

Writes into ``--output`` (default: the run folder):

- ``ablation.md``: per row and dataset, exact image / pixel AUROC and AUPRO (mean ± std over seeds)
  next to the paper's MVTec AD image AUROC, then the paper's three conclusions checked on these
  numbers (each line says whether it holds and by how much);
- ``ablation_auroc.png``: image and pixel AUROC per row and dataset;
- ``ablation_full_model_<dataset>.png``: for the full model (each dataset, first seed), a normal and a
  defective test image with their per-token intra- and inter-correlation KL (stride-8 level,
  averaged over layers and heads) and the distribution of the learned sigmas.

Every number comes from the run's own result files and checkpoint; nothing is typed in except the
paper's column.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The paper's Table 4 (MVTec AD, image AUROC), keyed by the row names of benchmarks/ablation.yaml.
PAPER_IMAGE_AUROC = {
    "Rec": ("patch-wise only (Rec)", 0.972),
    "Intra-noEnt-Div": ("intra w/o entropy (Div)", 0.700),
    "Intra-Div": ("intra with entropy (Div)", 0.911),
    "Intra-RecDiv": ("intra with entropy (Rec&Div)", 0.974),
    "InterMean-RecDiv": ("inter, mean reference (Rec&Div)", 0.980),
    "InterCoreset-RecDiv": ("inter, coreset reference (Rec&Div)", 0.925),
    "IntraInter-Div": ("intra + inter (Div)", 0.896),
    "Full-RecDiv": ("full model (Rec&Div)", 0.992),
}
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "AUPRO@0.3"))


def load_cells(run_dir: Path) -> list[dict[str, Any]]:
    """The finished cell records of a harness run."""
    cells = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*.json"))]
    cells = [c for c in cells if c.get("status") == "ok" and "metrics" in c]
    if not cells:
        msg = f"no finished cells under {run_dir / 'cells'}: run the benchmark first."
        raise SystemExit(msg)
    return cells


def summarise(cells: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """(dataset, row) -> metric -> (mean, sample std, seeds)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["dataset"], cell["model"]), []).append(cell["metrics"])
    summary = {}
    for key, members in groups.items():
        entry = {}
        for metric, _ in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None and not np.isnan(m[metric])]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                entry[metric] = (statistics.fmean(values), std, len(values))
        summary[key] = entry
    return summary


def _fmt(value: tuple[float, float, int] | None) -> str:
    if value is None:
        return "–"
    mean, std, n = value
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def table(summary: dict, datasets: list[str], rows: list[str]) -> list[str]:
    """Markdown table: one line per row, image/pixel/AUPRO per dataset, the paper's column last."""
    header = "| row | " + " | ".join(f"{d} {label}" for d in datasets for _, label in METRICS) + " | paper MVTec image |"
    lines = [header, "|" + "---|" * (2 + len(datasets) * len(METRICS))]
    for row in rows:
        label, paper = PAPER_IMAGE_AUROC.get(row, (row, None))
        cells = [_fmt(summary.get((d, row), {}).get(metric)) for d in datasets for metric, _ in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper if paper is not None else '–'} |")
    return lines


def conclusions(summary: dict, datasets: list[str]) -> list[str]:
    """The paper's claims, checked per dataset on image AUROC (pixel AUROC in brackets)."""

    def value(dataset: str, row: str, metric: str) -> float | None:
        entry = summary.get((dataset, row), {}).get(metric)
        return None if entry is None else entry[0]

    def verdict(dataset: str, claim: str, better: str, others: list[str]) -> str:
        parts = []
        for metric in ("image_auroc", "pixel_auroc"):
            mine = value(dataset, better, metric)
            rivals = [(o, value(dataset, o, metric)) for o in others]
            rivals = [(o, v) for o, v in rivals if v is not None]
            if mine is None or not rivals:
                parts.append(f"{metric}: not measured")
                continue
            best_other, best_value = max(rivals, key=lambda item: item[1])
            margin = mine - best_value
            holds = "holds" if margin > 0 else ("tie" if margin == 0 else "does NOT hold")
            parts.append(f"{metric}: {holds} ({better} {mine:.3f} vs {best_other} {best_value:.3f}, {margin:+.3f})")
        return f"- {dataset}, {claim}: " + "; ".join(parts)

    lines = []
    for dataset in datasets:
        lines.append(verdict(dataset, "entropy helps (intra Div)", "Intra-Div", ["Intra-noEnt-Div"]))
        lines.append(verdict(dataset, "Rec and Div collaborate (intra)", "Intra-RecDiv", ["Rec", "Intra-Div"]))
        lines.append(verdict(dataset, "Rec and Div collaborate (intra+inter)", "Full-RecDiv", ["Rec", "IntraInter-Div"]))
        others = [row for row in PAPER_IMAGE_AUROC if row != "Full-RecDiv"]
        lines.append(verdict(dataset, "the full model is best", "Full-RecDiv", others))
    return lines


def auroc_figure(path: Path, summary: dict, datasets: list[str], rows: list[str]) -> None:
    """Image and pixel AUROC per row (bars), one panel per dataset, with the paper's image AUROC."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.6), squeeze=False)
    positions = np.arange(len(rows))
    for axis, dataset in zip(axes[0], datasets, strict=True):
        lowest = 1.0
        for offset, (metric, label) in zip((-0.2, 0.2), METRICS[:2], strict=True):
            entries = [summary.get((dataset, row), {}).get(metric) for row in rows]
            means = [e[0] if e else np.nan for e in entries]
            stds = [e[1] if e else 0.0 for e in entries]
            lowest = min([lowest, *[m for m in means if not np.isnan(m)]])
            axis.bar(positions + offset, means, 0.4, yerr=stds if any(stds) else None, label=label, capsize=2)
        paper = [PAPER_IMAGE_AUROC.get(row, ("", np.nan))[1] for row in rows]
        axis.scatter(positions, paper, marker="_", s=300, color="black", label="paper image AUROC (MVTec AD)", zorder=3)
        axis.set_xticks(positions, rows, rotation=35, ha="right", fontsize="small")
        # Rows below chance are a finding: the axis must show their bars, not cut them off.
        axis.set_ylim(min(0.4, np.floor((lowest - 0.05) * 10) / 10), 1.0)
        axis.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(f"{dataset}: ablation rows (exact AUROC)")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _example_images(cell: dict[str, Any]) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """The first normal and the defective test image with the largest defect, ``(2, 3, H, W)`` in [0, 1]."""
    from anomalib_fod.benchmark.config import DatasetSpec  # noqa: PLC0415
    from anomalib_fod.benchmark.data import build_datamodule  # noqa: PLC0415

    spec = DatasetSpec(**{k: v for k, v in cell["spec"]["dataset"].items() if k in ("name", "class_path", "init_args")})
    datamodule = build_datamodule(spec)
    datamodule.setup("test")
    data = datamodule.test_data
    normal = next(i for i in range(len(data)) if int(data[i].gt_label) == 0)
    defects = [(float(data[i].gt_mask.sum()), i) for i in range(len(data)) if int(data[i].gt_label) == 1]
    defective = max(defects)[1]
    items = [data[normal], data[defective]]
    images = torch.stack([item.image for item in items])
    masks = np.stack([item.gt_mask.numpy().astype(float) for item in items])
    return images, [Path(item.image_path).name for item in items], masks


def full_model_figure(path: Path, cells: list[dict[str, Any]], dataset: str) -> str:
    """Per-token intra/inter KL on a normal and a defective image of ``dataset``, and the learned sigmas."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415
    from anomalib_fod.models.fod.correlation import sigma_from_logits  # noqa: PLC0415

    full = sorted((c for c in cells if c["model"] == "Full-RecDiv" and c["dataset"] == dataset), key=lambda c: c["seed"])
    if not full:
        return f"{dataset}: no finished full-model cell"
    cell = full[0]
    model = Fod.load_from_checkpoint(cell["checkpoint"]).eval()
    images, names, masks = _example_images(cell)

    sigmas: dict[str, list[torch.Tensor]] = {"intra": [], "inter": []}
    hooks = []
    for name, module in model.model.named_modules():
        if name.endswith(".sigma"):
            branch = "intra" if "self_attention" in name else "inter"
            hooks.append(module.register_forward_hook(lambda _m, _i, out, b=branch: sigmas[b].append(out)))
    with torch.no_grad():
        batch = model.pre_processor(images)
        run = model.model.run_levels(model.model.extract_features(batch), keep_maps=True)
    for hook in hooks:
        hook.remove()
    height, width = run.grids[0]
    level = run.levels[0]
    kl = {
        branch: torch.stack([s.kl_attention for s in getattr(level, branch)]).mean(0).reshape(-1, height, width)
        for branch in ("intra", "inter")
    }

    figure, axes = plt.subplots(2, 5, figsize=(20, 8))
    for row, (image, name, mask) in enumerate(zip(images, names, masks, strict=True)):
        axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
        axes[row, 0].contour(mask.squeeze(), levels=[0.5], colors="red", linewidths=1)
        axes[row, 0].set_title(("normal: " if row == 0 else "defective: ") + name, fontsize="small")
        for col, branch in enumerate(("intra", "inter"), start=1):
            shown = axes[row, col].imshow(kl[branch][row].numpy(), cmap="viridis")
            axes[row, col].set_title(f"{branch} KL per token (stride 8)", fontsize="small")
            figure.colorbar(shown, ax=axes[row, col], fraction=0.046)
        for col, branch in enumerate(("intra", "inter"), start=3):
            values = [sigma_from_logits(s[row].reshape(-1, 2)).flatten().numpy() for s in sigmas[branch]]
            axes[row, col].hist(np.concatenate(values), bins=60, color="tab:blue" if branch == "intra" else "tab:orange")
            axes[row, col].set_title(f"learned {branch} sigmas (all levels, layers, heads)", fontsize="small")
            axes[row, col].set_xlabel("sigma (tokens)")
    for axis in axes[:, :3].flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"full model, {cell['dataset']} seed {cell['seed']}: correlations on a normal vs a defective image")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"{cell['dataset']} seed {cell['seed']}, images {names[0]} (normal) and {names[1]} (defective)"


def _commit(git: dict[str, Any]) -> str:
    return (git.get("commit") or "unknown")[:12] + (" (dirty tree)" if git.get("dirty") else "")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the harness run folder (output_dir of the ablation config)")
    parser.add_argument("--output", type=Path, help="where to write (default: run_dir)")
    args = parser.parse_args(argv)
    output = args.output or args.run_dir
    output.mkdir(parents=True, exist_ok=True)
    cells = load_cells(args.run_dir)
    summary = summarise(cells)
    datasets = list(dict.fromkeys(c["dataset"] for c in cells))
    rows = [row for row in PAPER_IMAGE_AUROC if any(c["model"] == row for c in cells)]
    rows += [row for row in dict.fromkeys(c["model"] for c in cells) if row not in rows]
    environment = cells[0].get("environment", {})
    commits = sorted({_commit(c.get("environment", {}).get("git", {})) for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    spec = cells[0]["spec"]
    lines = [
        f"Run: `{args.run_dir}`; {len(cells)} cells; seeds {seeds}; image size {spec['image_size']}; "
        f"backbone {spec['backbone']} {spec['layers']}; epochs {spec['model']['max_epochs']}.",
        f"Commit(s): {', '.join(commits)}; device: {environment.get('gpu') or environment.get('cpu')}; "
        f"finished {max(c['finished'] for c in cells)}.",
        "",
        *table(summary, datasets, rows),
        "",
        "The paper's conclusions on these numbers:",
        "",
        *conclusions(summary, datasets),
        "",
    ]
    auroc_figure(output / "ablation_auroc.png", summary, datasets, rows)
    for dataset in datasets:
        figure = output / f"ablation_full_model_{dataset}.png"
        lines.append(f"Full-model figure `{figure.name}`: {full_model_figure(figure, cells, dataset)}.")
    (output / "ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
