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


@pytest.mark.slow
def test_image_auroc_clearly_above_chance(tmp_path):
    seed_everything(0, workers=True)
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
    engine = make_engine(tmp_path, max_epochs=EPOCHS, limit_val_batches=0)
    engine.fit(model, datamodule=datamodule)
    predictions = engine.predict(model, datamodule=datamodule)
    scores = torch.cat([batch.pred_score for batch in predictions]).numpy()
    labels = torch.cat([batch.gt_label for batch in predictions]).int().numpy()
    assert labels.sum() == 93 and (1 - labels).sum() == 35
    auroc = roc_auc_score(labels, scores)
    print(f"battery_weld image AUROC after {EPOCHS} epochs at {SIZE} px: {auroc:.4f}")
    # Measured on 2 shared CPU cores, 1 thread: 0.969 with this seed (seeds 3 and 4: 0.981, 0.897; after 3
    # epochs seeds 0-3 gave 0.91, 0.97, 0.96, 0.77, hence 4 epochs). Chance is 0.5; with 93 defective and
    # 35 good images the standard error of AUROC under the null is sqrt((n1 + n0 + 1) / (12 n1 n0)) = 0.057,
    # so 0.75 is 4.3 sigma above chance and still well below every run measured.
    assert auroc >= 0.75
