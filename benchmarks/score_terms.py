"""Which of FOD's scoring terms separates normal from defective images, per level: a diagnosis tool.

A trained FOD checkpoint scores a test set with every scoring term the model can compute, without
retraining: the reconstruction term alone (``rec``), the inter or intra divergence alone (``div``),
their product (``rec_div``, the paper's score), each on both levels and on each level alone. A term
below 0.5 AUROC ranks defective images *below* normal ones, which points at the part of the model
to look at when a dataset goes wrong.

The reconstruction term is also split into its two parts, the MSE and ``1 - cos``, alone and times
the divergence. ``--train-residuals`` adds one more pass over the training images and a variant of
the MSE in which each channel's squared error is divided by that channel's mean squared error on the
training set, so no channel counts more because the backbone happens to make it larger or harder to
reconstruct on normal data.

    python benchmarks/score_terms.py --checkpoint RUN/work/<cell>/engine/.../model.ckpt \
        --root datasets/mvtec_ad --category bottle

Exact image AUROC (scikit-learn, raw scores, image score = max of the blurred map) and pixel AUROC
at the model's input size (images and masks pre-processed as ``Engine.test`` does). Prints a Markdown table; ``--json``
also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

# (row label, scoring, with_intra, with_inter): which statistics AnomalyMapGenerator reads.
TERMS = (
    ("rec (patch-wise)", "rec", False, False),
    ("div, inter", "div", False, True),
    ("div, intra", "div", True, False),
    ("rec x div, inter (paper)", "rec_div", False, True),
    ("rec x div, intra", "rec_div", True, False),
)

# (row label, part of the reconstruction term, times the divergence): the model's reconstruction_term
# setting, or (mse_norm) the MSE normalised per channel by the training residuals.
PART_TERMS = (
    ("rec: MSE part", "mse", False),
    ("rec: 1 - cos part", "cos", False),
    ("MSE part x div", "mse", True),
    ("1 - cos part x div", "cos", True),
)
TRAIN_RESIDUAL_TERMS = (
    ("rec: MSE / train residual", "mse_norm", False),
    ("MSE / train residual x div", "mse_norm", True),
)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained Fod / Ed checkpoint (.ckpt)")
    parser.add_argument("--root", type=Path, required=True, help="MVTec-layout dataset root")
    parser.add_argument("--category", required=True, help="category folder under --root")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--train-residuals",
        action="store_true",
        help="also score the MSE normalised per channel by the training set's mean squared error (one more pass)",
    )
    return parser


@torch.no_grad()
def collect(model: Any, loader: Any) -> dict[str, Any]:  # noqa: ANN401 - Fod and an anomalib loader
    """Per level tokens, grids and full branch statistics of every test image."""
    from anomalib_fod.benchmark.curve import feature_batches, labels_and_masks  # noqa: PLC0415
    from anomalib_fod.models.fod.torch_model import to_tokens  # noqa: PLC0415

    fod = model.model
    records: dict[str, Any] = {"tokens": [], "outputs": [], "labels": [], "masks": []}
    # Pre-processed as Engine.test/predict do, not with the export transform.
    for batch, features in feature_batches(model, loader, "scoring the test set"):
        tokens = [to_tokens(f) for f in features]
        grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        outputs = [level(t, h, w, True, True, False) for level, t, (h, w) in zip(fod.levels, tokens, grids, strict=True)]
        records["tokens"].append(tokens)
        records["outputs"].append(outputs)
        records["grids"] = grids
        records["size"] = (int(batch.image.shape[-2]), int(batch.image.shape[-1]))
        labels, masks = labels_and_masks(batch)
        records["labels"].append(labels)
        records["masks"].append(masks)
    return records


@torch.no_grad()
def train_residual_scales(model: Any, loader: Any) -> list[torch.Tensor]:  # noqa: ANN401 - Fod and an anomalib loader
    """Per level ``(C,)`` mean squared reconstruction error of every channel over all training tokens."""
    from anomalib_fod.benchmark.curve import feature_batches  # noqa: PLC0415
    from anomalib_fod.models.fod.torch_model import to_tokens  # noqa: PLC0415

    fod = model.model
    sums: list[torch.Tensor | float] = [0.0] * len(fod.levels)
    counts = [0] * len(fod.levels)
    for _, features in feature_batches(model, loader, "training residuals"):
        for i, (level, feature) in enumerate(zip(fod.levels, features, strict=True)):
            tokens = to_tokens(feature)
            output = level(tokens, int(feature.shape[-2]), int(feature.shape[-1]), False, False, False)
            sums[i] = sums[i] + (tokens.float() - output.reconstruction.float()).square().sum(dim=(0, 1))
            counts[i] += tokens.shape[0] * tokens.shape[1]
    return [total / count for total, count in zip(sums, counts, strict=True)]


def _normalised_mse_generator_class() -> type:
    from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator  # noqa: PLC0415

    class NormalisedMseGenerator(AnomalyMapGenerator):
        """The model's scoring with ``rec`` = MSE with each channel divided by its training mean squared error."""

        def __init__(self, settings: Any, scales: list[torch.Tensor]) -> None:  # noqa: ANN401 - FodSettings
            super().__init__(settings)
            self.scales = scales

        def reconstruction_score(
            self,
            tokens: torch.Tensor,
            output: Any,  # noqa: ANN401 - LevelOutput
            level: int = 0,
            covariance: str | None = None,  # noqa: ARG002 - no covariance in this term
        ) -> torch.Tensor:
            error = tokens.float() - output.reconstruction.float()
            return (error.square() / self.scales[level]).mean(dim=-1)

    return NormalisedMseGenerator


def score(records: dict[str, Any], generator: Any, levels: list[int]) -> dict[str, float]:  # noqa: ANN401
    """Exact metrics of one ``AnomalyMapGenerator`` (or subclass) on the given levels."""
    from anomalib_fod.evaluation import exact_metrics  # noqa: PLC0415

    scores, maps = [], []
    for tokens, outputs in zip(records["tokens"], records["outputs"], strict=True):
        anomaly_map, pred = generator(
            [tokens[i] for i in levels],
            [outputs[i] for i in levels],
            [records["grids"][i] for i in levels],
            records["size"],
        )
        scores.append(pred)
        maps.append(anomaly_map[:, 0])
    return exact_metrics(
        torch.cat(scores).numpy(),
        torch.cat(records["labels"]).numpy(),
        torch.cat(maps).numpy(),
        torch.cat(records["masks"]).numpy(),
    )


def main(argv: list[str] | None = None) -> int:
    """Score the test set with every term and print the table."""
    args = build_parser().parse_args(argv)
    from anomalib.data import MVTecAD  # noqa: PLC0415

    import anomalib_fod  # noqa: PLC0415
    from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator  # noqa: PLC0415
    from anomalib_fod.models.fod.settings import FodSettings  # noqa: PLC0415

    model = anomalib_fod.Fod.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    blur = float(model.hparams.get("blur_sigma", 4.0))
    datamodule = MVTecAD(
        root=args.root,
        category=args.category,
        eval_batch_size=args.batch_size,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    datamodule.setup()
    records = collect(model, datamodule.test_dataloader())
    n_levels = len(records["grids"])
    level_sets = {"all levels": list(range(n_levels))} | {f"level {i} only": [i] for i in range(n_levels)}
    rows = []
    own = model.model.anomaly_map_generator
    for term in TERMS:
        if (term[2] and not own.with_intra) or (term[3] and not own.with_inter):
            continue
        generator = AnomalyMapGenerator(
            FodSettings(
                scoring=term[1], reconstruction_term="mse_cos", with_intra=term[2], with_inter=term[3], blur_sigma=blur,
                map_level_weights=None, map_align_corners=True,
            )
        )
        for name, levels in level_sets.items():
            rows.append({"term": term[0], "levels": name, **score(records, generator, levels)})
    part_terms = list(PART_TERMS)
    scales = None
    if args.train_residuals:
        train = datamodule.train_data
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, collate_fn=train.collate_fn)
        scales = train_residual_scales(model, loader)
        part_terms += TRAIN_RESIDUAL_TERMS
    normalised_mse = _normalised_mse_generator_class()
    for label, part, with_div in part_terms:
        if with_div and not (own.with_intra or own.with_inter):
            continue
        scoring = "rec_div" if with_div else "rec"
        settings = FodSettings(
            scoring=scoring,
            reconstruction_term="mse_cos",
            map_level_weights=None,
            map_align_corners=True,
            with_intra=own.with_intra,
            with_inter=own.with_inter,
            blur_sigma=blur,
        )
        for name, levels in level_sets.items():
            if part == "mse_norm":
                generator = normalised_mse(settings, [scales[i] for i in levels])
            else:  # the model's own reconstruction_term setting
                generator = AnomalyMapGenerator(replace(settings, reconstruction_term=part))
            rows.append({"term": label, "levels": name, **score(records, generator, levels)})
    print("| term | levels | image AUROC | pixel AUROC | AUPRO@0.3 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['term']} | {row['levels']} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | {row['pixel_aupro']:.4f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
