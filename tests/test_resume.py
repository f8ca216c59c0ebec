"""Interrupted training leaves a resumable checkpoint, and resuming reproduces the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from anomalib_fod import Fod
from anomalib_fod.callbacks import INTERRUPTED_CHECKPOINT

from conftest import TINY, TRAIN_BATCH, make_datamodule, make_engine


class InterruptAtEpoch(Callback):
    """Simulate Ctrl-C at the first training batch of ``epoch`` (its data order is already drawn)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            raise KeyboardInterrupt


def _model() -> Fod:
    # No feature cache: an uninterrupted run would serve epoch 2 from features computed in
    # epoch-1 batches, a resumed run recomputes them in epoch-2 batches.
    return Fod(pre_trained=False, image_size=64, visualizer=False, cache_features=False, **TINY)


def _state(model: Fod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _resume(checkpoint: Path, datamodule, root: Path) -> Fod:  # noqa: ANN001
    seed_everything(999)
    resumed = _model()
    make_engine(root, max_epochs=EPOCHS).fit(resumed, datamodule=datamodule, ckpt_path=checkpoint)
    return resumed


EPOCHS = 2


@pytest.mark.slow
def test_interrupted_run_leaves_a_resumable_checkpoint(dummy_dataset: Path, tmp_path: Path) -> None:
    """Ctrl-C leaves interrupted.ckpt; resuming restores references, optimizer and loop progress.

    The resumed run ends at the same step with bit-identical reference features and the optimizer
    state carried over. It does not reproduce the uninterrupted weights bit for bit: Lightning
    replays an interrupted epoch with a new data order.
    """
    root, category = dummy_dataset.parent, dummy_dataset.name

    def datamodule():  # noqa: ANN202
        return make_datamodule(root, category, TRAIN_BATCH, 4)

    seed_everything(7)
    straight = _model()
    make_engine(tmp_path / "straight", max_epochs=EPOCHS).fit(straight, datamodule=datamodule())

    seed_everything(7)
    interrupted = _model()
    engine = make_engine(tmp_path / "interrupted", max_epochs=EPOCHS, callbacks=[InterruptAtEpoch(1)])
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
        engine.fit(interrupted, datamodule=datamodule())
    checkpoints = list((tmp_path / "interrupted").rglob(INTERRUPTED_CHECKPOINT))
    assert len(checkpoints) == 1, "no resumable checkpoint was written on interrupt"
    steps_before = engine.trainer.global_step
    assert 0 < steps_before < straight.trainer.global_step

    resumed = _resume(checkpoints[0], datamodule(), tmp_path / "resumed")
    assert resumed.trainer.global_step == straight.trainer.global_step
    assert resumed.trainer.current_epoch == straight.trainer.current_epoch
    for level_want, level_got in zip(straight.model.levels, resumed.model.levels, strict=True):
        torch.testing.assert_close(level_got.ref_features, level_want.ref_features, rtol=0, atol=0)
    opt_want = straight.trainer.optimizers[0].state_dict()["state"]
    opt_got = resumed.trainer.optimizers[0].state_dict()["state"]
    assert all(opt_got[i]["step"] == opt_want[i]["step"] for i in opt_want), "optimizer state was not restored"
