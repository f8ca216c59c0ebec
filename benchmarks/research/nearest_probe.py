"""The nearest normal token beside the Gaussian: does a non-parametric distance close PatchCore's lead?

Research probe (frozen features, no training). In the harness PatchCore runs on ``Fod()``'s own backbone and
levels, so where it ranks images better (the pooled-paper texture) the difference is the scoring alone: the
distance to the nearest training token against ``Fod()``'s per-position Gaussian. A Gaussian per position holds
every look of a product in one ellipsoid; the nearest token keeps the looks apart but has no notion of position.
Here, per level:

- ``default``: ``Fod()``'s score (blended distance, map levels 7/8 : 1/8, image score from the per-position
  distances with the levels averaged);
- ``knn_white`` / ``knn_raw``: the distance to the nearest token of a random bank of training tokens (every
  exposure gain), in the shared whitening or in the raw features (PatchCore's metric); map levels 7/8 : 1/8,
  image score the map's maximum;
- ``sum_z``: both in level-wide z-units, added (map from the blended distance, image from the per-position
  distance, each plus the whitened nearest-token distance). The z-units come from held-out training images: two
  folds, each scored by statistics and a bank fitted on the other, so a normal image is scored as a test image is.

Nothing reads a test label to choose; every candidate is reported.

    python benchmarks/research/nearest_probe.py --data piped_paper_tl=<datasets>:piped_paper_tl --image-size 256 256 \\
        --seeds 0 1 2 --out results/research/nearest_256.jsonl
    python benchmarks/research/nearest_probe.py --report results/research/nearest_256.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from selection_probe import FeatureProbe, Statistics, metrics, probe_parser, run_datasets  # noqa: E402

MAP_WEIGHTS = (0.875, 0.125)


def nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``(Q,)`` Euclidean distance of each ``(Q, C)`` query to its nearest ``(M, C)`` bank row."""
    return torch.cat([torch.cdist(queries[s : s + chunk], bank).amin(dim=1) for s in range(0, len(queries), chunk)])


def shared_whitening(flat: torch.Tensor) -> torch.Tensor:
    """``(C, C)`` map that whitens ``(M, C)`` tokens with their shared covariance (0.1 % ridge)."""
    flat = flat.double()
    centred = flat - flat.mean(dim=0)
    covariance = centred.T @ centred / (len(flat) - 1)
    ridge = 1e-3 * covariance.trace() / covariance.shape[0]
    covariance += ridge * torch.eye(covariance.shape[0], dtype=covariance.dtype)
    return torch.linalg.cholesky(torch.linalg.inv(covariance)).float()


class NearestToken:
    """Per level, a bank of ``size`` of the ``(N, L, C)`` training tokens, in the shared whitening or raw: drawn at
    random, or (``coreset``) a greedy k-center coreset in the bank's own metric, as PatchCore keeps."""

    def __init__(self, levels: list[torch.Tensor], size: int, seed: int, whiten: bool, coreset: bool = False) -> None:
        from anomalib.models.components import KCenterGreedy  # noqa: PLC0415

        generator = torch.Generator().manual_seed(seed)
        self.transforms, self.banks = [], []
        for level in levels:
            flat = level.flatten(0, 1).double()
            transform = shared_whitening(flat) if whiten else None
            self.transforms.append(transform)
            if coreset and size < len(flat):
                torch.manual_seed(seed)  # the coreset's random projection and first centre
                mapped = self._map(flat.float(), transform)
                pick = torch.as_tensor(KCenterGreedy(mapped, sampling_ratio=size / len(flat)).select_coreset_idxs())
                self.banks.append(mapped[pick])
                continue
            pick = torch.randperm(len(flat), generator=generator)[:size]
            self.banks.append(self._map(flat[pick].float(), transform))

    @staticmethod
    def _map(tokens: torch.Tensor, transform: torch.Tensor | None) -> torch.Tensor:
        return tokens if transform is None else tokens @ transform

    def __call__(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level ``(N, L)`` nearest-token distances."""
        return [nearest(self._map(level.flatten(0, 1), t), bank).reshape(level.shape[:2])
                for level, t, bank in zip(levels, self.transforms, self.banks, strict=True)]


def held_out_values(
    gained: list[dict[str, Any]], plain: dict[str, Any], count: int, bank: int, seed: int, coreset: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Per level, each distance of the held-out training tokens, ``(N, L)`` (two folds, each scored by statistics
    and a bank fitted on the other; rows in fold order)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    folds = [order[0::2], order[1::2]]
    levels = range(len(plain["tokens"]))
    values: list[dict[str, list[torch.Tensor]]] = [{"blend": [], "position": [], "knn": []} for _ in levels]
    for fit, held in (folds, folds[::-1]):
        fit_tokens = [torch.cat([g["tokens"][i][fit] for g in gained]) for i in levels]
        stats = Statistics(fit_tokens)
        knn = NearestToken(fit_tokens, bank // 2, seed, True, coreset)
        held_tokens = [plain["tokens"][i][held] for i in levels]
        for i, distance in enumerate(knn(held_tokens)):
            own = stats.distances(held_tokens, i)
            values[i]["blend"].append(own["blend"])
            values[i]["position"].append(own["position"])
            values[i]["knn"].append(distance)
    return [{name: torch.cat(v) for name, v in level.items()} for level in values]


def held_out_moments(
    gained: list[dict[str, Any]], plain: dict[str, Any], count: int, bank: int, seed: int, coreset: bool = False,
) -> list[dict[str, tuple[float, float]]]:
    """Per level, the mean and std of each distance over held-out training tokens (two folds)."""
    return [{name: (float(v.mean()), float(v.std())) for name, v in level.items()}
            for level in held_out_values(gained, plain, count, bank, seed, coreset)]


def run_one(args: argparse.Namespace, name: str, root: Path, category: str) -> list[dict[str, Any]]:
    """Every seed's rows of one dataset; the features are extracted once (a frozen backbone: no seed changes them)."""
    probe = FeatureProbe(args, root, category)
    # The Gaussian and its test distances do not depend on the seed either: fitted once for every seed.
    train_levels = [torch.cat([g["tokens"][i] for g in probe.gained]) for i in range(len(probe.grids))]
    stats = Statistics(train_levels)
    per_level = [stats.distances(probe.test["tokens"], i) for i in range(len(probe.grids))]
    rows = []
    for seed in args.seeds:
        rows += score_seed(args, name, probe, train_levels, per_level, seed)
    return rows


def score_seed(
    args: argparse.Namespace, name: str, probe: FeatureProbe, train_levels: list[torch.Tensor],
    per_level: list[dict[str, torch.Tensor]], seed: int,
) -> list[dict[str, Any]]:
    """The rows of one seed (the banks and folds it draws), beside the Gaussian's ``per_level`` test distances."""
    start = time.perf_counter()
    gained, plain, test, size, generator, grids = (probe.gained, probe.plain, probe.test, probe.size,
                                                   probe.generator, probe.grids)
    knn_white = NearestToken(train_levels, args.bank, seed, whiten=True, coreset=args.coreset)(test["tokens"])
    knn_raw = NearestToken(train_levels, args.bank, seed, whiten=False, coreset=args.coreset)(test["tokens"])
    moments = held_out_moments(gained, plain, probe.count, args.bank, seed, args.coreset)

    def z(values: torch.Tensor, level: int, name: str) -> torch.Tensor:
        mean, std = moments[level][name]
        return (values - mean) / std

    def combined(map_levels: list[torch.Tensor], image_levels: list[torch.Tensor] | None) -> tuple:
        maps, image = generator.combine_levels(map_levels, grids, size, MAP_WEIGHTS)
        if image_levels is not None:
            image = generator.combine_levels(image_levels, grids, size)[1]
        return image.numpy(), maps[:, 0].numpy()

    candidates = {
        "default": combined([d["blend"] for d in per_level], [d["position"] for d in per_level]),
        "knn_white": combined(knn_white, None),
        "knn_raw": combined(knn_raw, None),
        "sum_z": combined([z(d["blend"], i, "blend") + z(k, i, "knn") for i, (d, k) in enumerate(
                              zip(per_level, knn_white, strict=True))],
                          [z(d["position"], i, "position") + z(k, i, "knn") for i, (d, k) in enumerate(
                              zip(per_level, knn_white, strict=True))]),
    }
    rows = []
    for candidate, result in candidates.items():
        image_auroc, pixel_auroc = metrics(result, test["labels"], test["masks"])
        rows.append({"dataset": name, "seed": seed, "candidate": candidate, "bank": args.bank,
                     "coreset": args.coreset,
                     "image_size": list(size), "image_auroc": image_auroc, "pixel_auroc": pixel_auroc,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name} seed {seed} {candidate}: {image_auroc:.4f} / {pixel_auroc:.4f}", flush=True)
    return rows


def _table(group: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: each candidate's mean +- std over seeds per dataset, and its mean difference to ``default``."""
    datasets = sorted({r["dataset"] for r in group})
    candidates = list(dict.fromkeys(r["candidate"] for r in group))

    def values(candidate: str, dataset: str, metric: str) -> torch.Tensor:
        return torch.tensor([r[metric] for r in group if r["candidate"] == candidate and r["dataset"] == dataset],
                            dtype=torch.float64)

    def cell(candidate: str, dataset: str) -> str:
        parts = []
        for metric in ("image_auroc", "pixel_auroc"):
            v = values(candidate, dataset, metric)
            parts.append(f"{float(v.mean()):.4f}" + (f" ± {float(v.std()):.4f}" if len(v) > 1 else ""))
        return " / ".join(parts) + f" (n {len(values(candidate, dataset, 'image_auroc'))})"

    def difference(candidate: str, metric: str) -> float:
        return sum(float(values(candidate, d, metric).mean() - values("default", d, metric).mean())
                   for d in datasets) / len(datasets)

    lines = ["| candidate | " + " | ".join(datasets) + " | mean minus `default` |", "|---" * (len(datasets) + 2) + "|"]
    for candidate in candidates:
        gap = " / ".join(f"{difference(candidate, m):+.4f}" for m in ("image_auroc", "pixel_auroc"))
        lines.append(f"| `{candidate}` | " + " | ".join(cell(candidate, d) for d in datasets) + f" | {gap} |")
    return lines


def report(rows_file: Path) -> str:
    """One markdown table per (image size, bank size, bank kind) of the rows in ``rows_file``."""
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]

    def key(row: dict[str, Any]) -> tuple:
        return tuple(row["image_size"]), row["bank"], row.get("coreset", False)

    out = []
    for size, bank, coreset in sorted({key(r) for r in rows}):
        out.append(f"### {size[0]}x{size[1]} px, bank {bank} ({'greedy coreset' if coreset else 'random tokens'})\n")
        out += _table([r for r in rows if key(r) == (size, bank, coreset)])
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:
        print(report(Path(argv[1])))
        return 0
    parser = probe_parser(__doc__, "the banks' random tokens and the folds")
    parser.add_argument("--bank", type=int, default=40000, help="training tokens kept per level")
    parser.add_argument("--coreset", action="store_true", help="a greedy k-center coreset instead of random tokens")
    return run_datasets(parser, argv, run_one)


if __name__ == "__main__":
    raise SystemExit(main())
