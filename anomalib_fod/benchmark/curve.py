"""Test metrics after every epoch: a convergence curve, for reporting only.

The harness never selects an epoch with it (every model is evaluated in its last state); the
curve tells a user how many epochs a recipe needs. Evaluating does not change training: the
random-number states are restored afterwards and the model goes back to train mode, so the final
weights are those of a run without the curve (tested). Its wall time is kept apart from ``fit_s``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from tqdm import tqdm

from anomalib_fod.evaluation import collect_predictions, exact_metrics
from anomalib_fod.models.fod.callbacks import ResidualStatisticsCallback


def preprocess_as_test(pl_module: pl.LightningModule, batch: Any) -> Any:  # noqa: ANN401 - anomalib batch
    """Pre-process ``batch`` in place as ``Engine.test``/``predict`` do, images and masks together.

    That is the pre-processor's ``transform`` (what its ``on_test_batch_start`` applies), not
    ``pre_processor(images)``: the latter is the *export* transform (resizing without antialiasing,
    what an exported model does), which differs from what the model was trained and tested with.
    """
    transform = getattr(getattr(pl_module, "pre_processor", None), "transform", None)
    if transform:
        batch.image, batch.gt_mask = transform(batch.image, batch.gt_mask)
    return batch


def feature_batches(
    pl_module: pl.LightningModule, loader: Iterable[Any], desc: str
) -> Iterator[tuple[Any, list[torch.Tensor]]]:
    """Each batch of ``loader`` pre-processed as ``Engine.test`` does, with its pooled backbone features.

    For the scripts that score a FOD model outside the engine (``benchmarks/research/convergence_probe.py``):
    one progress bar, one pre-processing path.

    Yields:
        ``(batch, features)``: the pre-processed anomalib batch and per level ``(B, C_i, h_i, w_i)``.
    """
    for batch in tqdm(loader, desc=desc, unit="batch"):
        batch = preprocess_as_test(pl_module, batch)
        yield batch, pl_module.model.extract_features(batch.image)


def labels_and_masks(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: ANN401 - anomalib batch
    """``(B,)`` int labels and ``(B, H, W)`` bool masks (``None`` without masks) of a pre-processed batch."""
    labels = batch.gt_label.flatten().int()
    if batch.gt_mask is None:
        return labels, None
    return labels, batch.gt_mask.reshape(batch.image.shape[0], *batch.image.shape[-2:]).bool()


class TestCurve(pl.Callback):
    """After each training epoch, exact image/pixel AUROC and AUPRO of the raw outputs on the test set.

    Images and masks are pre-processed and collected exactly as the cell's own ``Engine.predict``
    pass does (pixel metrics at the model's input size), so the last point equals the cell's metrics.

    Args:
        datamodule: the cell's anomalib datamodule (its ``test_dataloader`` is used).
    """

    def __init__(self, datamodule: Any) -> None:  # noqa: ANN401 - anomalib datamodule
        super().__init__()
        self.datamodule = datamodule
        self.points: list[dict[str, float]] = []
        # Kept apart, as CellCheckpoint keeps its fit clock: a resumed cell's own fit time must
        # exclude only this process's evaluations.
        self.seconds_before = 0.0
        self.seconds_here = 0.0

    @property
    def seconds(self) -> float:
        """Wall seconds of evaluation so far, over every process that trained this cell."""
        return self.seconds_before + self.seconds_here

    def state_dict(self) -> dict[str, Any]:
        """The points and seconds so far travel with every checkpoint, so a resumed cell keeps them."""
        return {"points": list(self.points), "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the curve of the checkpoint a cell resumes from."""
        self.points = list(state_dict["points"])
        self.seconds_before = float(state_dict["seconds"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate, then restore the model's mode and every random-number state."""
        start = time.perf_counter()
        python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        was_training = pl_module.training
        with torch.random.fork_rng(devices=devices):
            # A score calibrated on the training images (FOD's whitened residual) is refitted to the
            # current weights first, as before a validation: the point is what the model would score.
            for callback in trainer.callbacks:
                if isinstance(callback, ResidualStatisticsCallback):
                    callback.refresh(trainer, pl_module)
            pl_module.eval()
            try:
                metrics = self._evaluate(pl_module)
            finally:
                pl_module.train(was_training)
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
        self.seconds_here += time.perf_counter() - start
        self.points.append({"epoch": trainer.current_epoch + 1, **metrics})
        tqdm.write(
            f"[curve] epoch {trainer.current_epoch + 1}: image AUROC {metrics['image_auroc']:.4f}, "
            f"pixel AUROC {metrics['pixel_auroc']:.4f}",
        )

    @torch.no_grad()
    def _evaluate(self, pl_module: pl.LightningModule) -> dict[str, float]:
        if getattr(self.datamodule, "test_data", None) is None:
            self.datamodule.setup("test")

        predictions = []
        for batch in self.datamodule.test_dataloader():
            batch = preprocess_as_test(pl_module, batch)
            output = pl_module.model(batch.image.to(pl_module.device))  # raw: no post-processor
            predictions.append(batch.update(in_place=False, pred_score=output.pred_score, anomaly_map=output.anomaly_map))
        raw = collect_predictions(predictions)
        return exact_metrics(raw["scores"], raw["labels"], raw["maps"], raw["masks"])
