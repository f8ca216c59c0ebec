"""FOD learns: a few epochs on the embedded real battery-weld data separate defects from good welds."""

from __future__ import annotations

import pytest
import torch
from fod_helpers import EMBEDDED_DATA_ROOT, make_datamodule, make_engine
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score

from anomalib_fod import Fod

SIZE = 96
EPOCHS = 4


SEEDS = (0, 1, 2)


def _train_and_score(seed: int, root) -> float:  # noqa: ANN001
    seed_everything(seed, workers=True)
    # batch 1 as in the paper; a smaller, faster Transformer than the paper's with a 10x learning rate so
    # that 4 epochs (148 steps) on 2 CPU cores are enough to learn the normal welds.
    datamodule = make_datamodule(EMBEDDED_DATA_ROOT, "battery_weld", train_batch_size=1, eval_batch_size=32)
    model = Fod(
        d_models=(64, 128),
        num_heads=4,
        num_layers=2,
        learning_rate=1e-3,
        pre_processor=Fod.configure_pre_processor((SIZE, SIZE)),
        post_processor=False,  # raw scores: exact AUROC, no min-max clamping ties
        evaluator=False,
        visualizer=False,
    )
    engine = make_engine(root, max_epochs=EPOCHS, limit_val_batches=0)
    engine.fit(model, datamodule=datamodule)
    predictions = engine.predict(model, datamodule=datamodule)
    scores = torch.cat([batch.pred_score for batch in predictions]).numpy()
    labels = torch.cat([batch.gt_label for batch in predictions]).int().numpy()
    assert labels.sum() == 93 and (1 - labels).sum() == 35
    return roc_auc_score(labels, scores)


@pytest.mark.slow
def test_image_auroc_clearly_above_chance(tmp_path):
    """The median image AUROC of three seeds is far above chance.

    One short run is not enough: with this fast recipe (batch 1, lr 1e-3, 148 steps) the data order
    matters. Measured with the (seed, epoch)-seeded training order: seeds 0, 1, 2, 3 gave 0.48, 0.98,
    0.94, 0.99 (2 shared CPU cores, 1 thread). Chance is 0.5; with 93 defective and 35 good images the
    standard error of AUROC under the null is sqrt((n1 + n0 + 1) / (12 n1 n0)) = 0.057, so 0.75 is
    4.3 sigma above chance and still well below the typical run.
    """
    aurocs = [_train_and_score(seed, tmp_path / f"seed{seed}") for seed in SEEDS]
    print(f"battery_weld image AUROC after {EPOCHS} epochs at {SIZE} px, seeds {SEEDS}: {aurocs}")
    assert sorted(aurocs)[len(aurocs) // 2] >= 0.75
