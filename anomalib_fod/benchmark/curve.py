"""Test metrics after every epoch: a convergence curve, for reporting only.

The harness never selects an epoch with it (every model is evaluated in its last state); the
curve tells a user how many epochs a recipe needs. Evaluating does not change training: the
random-number states are restored afterwards and the model goes back to train mode, so the final
weights are those of a run without the curve (tested). Its wall time is kept apart from ``fit_s``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .metrics import exact_metrics


def test_transform(pl_module: pl.LightningModule, images: torch.Tensor) -> torch.Tensor:
    """The pre-processing ``Engine.test``/``predict`` apply (the pre-processor's ``transform``).

    Not ``pre_processor(images)``: that is the *export* transform (resizing without antialiasing,
    what an exported model does), which differs from what the model was trained and tested with.
    """
    pre_processor = getattr(pl_module, "pre_processor", None)
    if not pre_processor:
        return images
    transform = getattr(pre_processor, "transform", None)
    return transform(images) if transform is not None else pre_processor(images)


class TestCurve(pl.Callback):
    """After each training epoch, exact image/pixel AUROC and AUPRO of the raw outputs on the test set.

    Pixel metrics are computed at the model's output size (masks resized with nearest-neighbour),
    which keeps an epoch's evaluation cheap; the final numbers of a cell use the full-size masks,
    so the last point of the curve can differ from them slightly.

    Args:
        datamodule: the cell's anomalib datamodule (its ``test_dataloader`` is used).
    """

    def __init__(self, datamodule: Any) -> None:  # noqa: ANN401 - anomalib datamodule
        super().__init__()
        self.datamodule = datamodule
        self.points: list[dict[str, float]] = []
        self.seconds = 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate, then restore the model's mode and every random-number state."""
        start = time.perf_counter()
        python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        was_training = pl_module.training
        with torch.random.fork_rng(devices=devices):
            pl_module.eval()
            try:
                metrics = self._evaluate(pl_module)
            finally:
                pl_module.train(was_training)
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
        self.seconds += time.perf_counter() - start
        self.points.append({"epoch": trainer.current_epoch + 1, **metrics})
        tqdm.write(
            f"[curve] epoch {trainer.current_epoch + 1}: image AUROC {metrics['image_auroc']:.4f}, "
            f"pixel AUROC {metrics['pixel_auroc']:.4f}",
        )

    @torch.no_grad()
    def _evaluate(self, pl_module: pl.LightningModule) -> dict[str, float]:
        if getattr(self.datamodule, "test_data", None) is None:
            self.datamodule.setup("test")
        scores, labels, maps, masks = [], [], [], []
        for batch in self.datamodule.test_dataloader():
            images = batch.image.to(pl_module.device)
            images = test_transform(pl_module, images)
            output = pl_module.model(images)  # raw: no post-processor
            scores.append(output.pred_score.detach().flatten().float().cpu())
            labels.append(batch.gt_label.flatten().int().cpu())
            if output.anomaly_map is not None and batch.gt_mask is not None:
                anomaly_map = output.anomaly_map.detach().float().cpu().reshape(images.shape[0], -1, *output.anomaly_map.shape[-2:])[:, 0]
                mask = batch.gt_mask.float().reshape(images.shape[0], 1, *batch.gt_mask.shape[-2:])
                mask = nn.functional.interpolate(mask, size=anomaly_map.shape[-2:], mode="nearest")[:, 0] > 0.5  # noqa: PLR2004
                maps.append(anomaly_map)
                masks.append(mask)
        has_maps = bool(maps) and len(maps) == len(scores)
        return exact_metrics(
            torch.cat(scores).numpy(),
            torch.cat(labels).numpy(),
            torch.cat(maps).numpy() if has_maps else None,
            torch.cat(masks).numpy() if has_maps else None,
        )
