"""How fast does a FOD setting learn? Exact test metrics after chosen optimizer step counts.

An A/B tool for model settings, much cheaper than a benchmark cell: the frozen backbone runs once
per image, then the Transformers train directly on the cached features (batch ``--batch``, Adam at
the model's learning rate, the model's own minimax loss) and the test set is scored after every step
count in ``--eval-at``. No Lightning, no export, no per-epoch bookkeeping. Reporting only: the test
set selects nothing here either.

    python benchmarks/research/convergence_probe.py --root datasets/mvtec_ad --category bottle \
        --eval-at 100,209 --set out_projection=true --json probe.json

Images and masks are pre-processed as ``Engine.test`` does (the model's pre-processor transform).
Exact image AUROC / pixel AUROC / AUPRO@0.3 / image F1-max on raw scores, as the benchmark harness
computes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="MVTec-layout dataset root")
    parser.add_argument("--category", required=True, help="category folder under --root")
    parser.add_argument("--model", default="Fod", choices=("Fod", "Ed"), help="model class (default Fod)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model setting (YAML value), repeatable, e.g. --set out_projection=true",
    )
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1, help="training batch (default 1, the paper's code)")
    parser.add_argument("--eval-at", required=True, help="comma-separated optimizer step counts, e.g. 100,209")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    parser.add_argument("--json", type=Path, help="also write the settings and results here")
    return parser


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["a=1", "b=true"]`` -> ``{"a": 1, "b": True}`` (values parsed as YAML)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            msg = f"--set expects KEY=VALUE, got {pair!r}"
            raise ValueError(msg)
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def parse_steps(text: str) -> list[int]:
    """``"100,209"`` -> ``[100, 209]``, sorted, each >= 0."""
    steps = sorted({int(v) for v in text.split(",") if v.strip()})
    if not steps or steps[0] < 0:
        msg = f"--eval-at needs non-negative step counts, got {text!r}"
        raise ValueError(msg)
    return steps


@torch.no_grad()
def cache_features(model: Any, loader: Any, desc: str) -> dict[str, Any]:  # noqa: ANN401 - Fod and a loader
    """Pooled backbone features per level ``(N, C_i, h_i, w_i)``, labels ``(N,)`` and masks ``(N, H, W)``."""
    from anomalib_fod.benchmark.curve import feature_batches, labels_and_masks  # noqa: PLC0415

    features, labels, masks = [], [], []
    for batch, pooled in feature_batches(model, loader, desc):
        features.append(pooled)
        batch_labels, batch_masks = labels_and_masks(batch)
        labels.append(batch_labels)
        if batch_masks is not None:
            masks.append(batch_masks)
    return {
        "features": [torch.cat([f[level] for f in features]) for level in range(len(features[0]))],
        "labels": torch.cat(labels),
        "masks": torch.cat(masks) if masks else None,
        "size": tuple(int(v) for v in batch.image.shape[-2:]),
    }


def index_stream(count: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless training batches of indices: a fresh shuffle each epoch, the last batch may be short."""
    while True:
        order = torch.randperm(count, generator=generator)
        for first in range(0, count, batch):
            yield order[first : first + batch]


@torch.no_grad()
def evaluate(
    model: Any,  # noqa: ANN401 - Fod
    test: dict[str, Any],
    train: dict[str, Any] | None = None,
    batch: int = 8,
    seed: int | None = None,
) -> dict[str, float]:
    """Exact metrics of the model's current state on the cached test features.

    A score calibrated on the training images (the whitened residual) is refitted to the current
    weights on ``train``'s cached features first, as the model's callback does before a validation.
    """
    from anomalib_fod.evaluation import exact_metrics  # noqa: PLC0415
    from anomalib_fod.models.fod.fitting import KeptLevels, fit_statistics  # noqa: PLC0415
    from anomalib_fod.models.fod.nearest import fit_nearest  # noqa: PLC0415

    fod = model.model
    generator = fod.anomaly_map_generator
    if generator.needs_statistics:
        if train is None:
            msg = "this model's score needs statistics of the training images: pass their cached features."
            raise ValueError(msg)
        count = train["labels"].shape[0]
        batches = ([f[i : i + batch] for f in train["features"]] for i in range(0, count, batch))
        # The nearest-token score is fitted on the same pass, as the model's callback does (the cached features are
        # the images as they are: one gain).
        nearest = generator.keeps_training_tokens == "nearest_tokens"
        kept = KeptLevels([], [], []) if nearest else None
        fit_statistics(fod, batches, keep=kept)
        if kept is not None:
            settings = fod.settings
            fit_nearest(
                generator.nearest, generator.statistics, kept.tokens, kept.residuals, (1.0,),
                settings.nearest_tokens, torch.device("cpu"), settings.nearest_position_limit, seed,
            )
    fod.eval()
    scores, maps = [], []
    count = test["labels"].shape[0]
    for start in range(0, count, batch):
        output = fod.forward_features([f[start : start + batch] for f in test["features"]], test["size"])
        scores.append(output.pred_score.flatten())
        maps.append(output.anomaly_map[:, 0])
    fod.train()
    masks = test["masks"].numpy() if test["masks"] is not None else None
    return exact_metrics(torch.cat(scores).numpy(), test["labels"].numpy(), torch.cat(maps).numpy(), masks)


def main(argv: list[str] | None = None) -> int:
    """Train, score at every requested step count, print a table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(args.set)
        steps = parse_steps(args.eval_at)
    except ValueError as error:
        parser.error(str(error))
    from anomalib.data import MVTecAD  # noqa: PLC0415

    import anomalib_fod  # noqa: PLC0415

    torch.manual_seed(args.seed)
    model_class = getattr(anomalib_fod, args.model)
    try:
        # scored from cached backbone features: the map-only levels, which read the images, stay out unless asked for
        without_map_levels = {"fine_map_weight": 0.0, "aligned_map_weight": 0.0}
        model = model_class(image_size=tuple(args.image_size), visualizer=False, **{**without_map_levels, **settings})
    except TypeError as error:
        parser.error(f"unknown {args.model} setting: {error}")
    if model.model.with_inter and any(level.reference != "mean" for level in model.model.levels):
        parser.error("the probe builds mean references only; use the benchmark harness for reference=coreset")
    datamodule = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    datamodule.setup()
    train = cache_features(model, datamodule.train_dataloader(), "backbone: training images")
    test = cache_features(model, datamodule.test_dataloader(), "backbone: test images")
    model.model.set_mean_reference([f.mean(dim=0) for f in train["features"]])

    params = [p for p in model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=model.learning_rate)
    stream = index_stream(train["labels"].shape[0], args.batch, torch.Generator().manual_seed(args.seed))
    results: list[dict[str, Any]] = []
    step, start = 0, time.perf_counter()
    model.model.train()
    progress = tqdm(total=steps[-1], desc="training", unit="step")
    for target in steps:
        while step < target:
            output = model.model.forward_features([f[next(stream)] for f in train["features"]])
            loss, _ = model.loss(output.tokens, output.levels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.update()
        results.append({"step": step, "images_seen": step * args.batch, **evaluate(model, test, train, seed=args.seed)})
        progress.write(json.dumps(results[-1]))
    progress.close()
    seconds = time.perf_counter() - start
    print(f"| step | images seen | image AUROC | pixel AUROC | AUPRO@0.3 |   ({args.model}, {settings or 'defaults'})")
    print("|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['step']} | {row['images_seen']} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} "
            f"| {row['pixel_aupro']:.4f} |"
        )
    if args.json is not None:
        record = {
            "model": args.model,
            "settings": settings,
            "image_size": list(args.image_size),
            "batch": args.batch,
            "seed": args.seed,
            "trainable_parameters": sum(p.numel() for p in params),
            "seconds": seconds,
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
