"""Interrupted training leaves a resumable checkpoint, and resuming reproduces the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from anomalib_fod import Fod
from anomalib_fod.callbacks import INTERRUPTED_CHECKPOINT

from conftest import TINY, TRAIN_BATCH, make_datamodule, make_engine


class InterruptAt(Callback):
    """Simulate Ctrl-C just before training batch ``batch_idx`` of ``epoch``."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            raise KeyboardInterrupt


class RecordBatches(Callback):
    """Record the image batches a run trains on (to compare data orders)."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches.append(batch.image.detach().clone())


def _model() -> Fod:
    # No feature cache: an uninterrupted run would serve epoch 2 from features computed in
    # epoch-1 batches, a resumed run recomputes them in epoch-2 batches.
    return Fod(pre_trained=False, image_size=64, visualizer=False, cache_features=False, **TINY)


def _state(model: Fod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _resume(checkpoint: Path, datamodule, root: Path, recorder: RecordBatches) -> Fod:  # noqa: ANN001
    seed_everything(999)  # a different RNG history than the interrupted process had
    resumed = _model()
    make_engine(root, max_epochs=EPOCHS, callbacks=[recorder]).fit(resumed, datamodule=datamodule, ckpt_path=checkpoint)
    return resumed


EPOCHS = 3
# 10 images in batches of 3: 4 batches per epoch; interrupt with 2 of epoch 1 done.
INTERRUPT_EPOCH, INTERRUPT_BATCH, BATCHES_PER_EPOCH = 1, 2, 4


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_run(dummy_dataset: Path, tmp_path: Path) -> None:
    """Ctrl-C mid-epoch leaves interrupted.ckpt; resuming it reproduces the uninterrupted run exactly.

    The resumed process is seeded differently, yet it trains on the same remaining batches in the
    same order and ends with bit-identical weights, reference features and optimizer state.
    """
    root, category = dummy_dataset.parent, dummy_dataset.name

    def datamodule():  # noqa: ANN202
        return make_datamodule(root, category, TRAIN_BATCH, 4)

    seed_everything(7)
    straight = _model()
    straight_batches = RecordBatches()
    make_engine(tmp_path / "straight", max_epochs=EPOCHS, callbacks=[straight_batches]).fit(
        straight, datamodule=datamodule()
    )

    seed_everything(7)
    interrupted = _model()
    engine = make_engine(
        tmp_path / "interrupted", max_epochs=EPOCHS, callbacks=[InterruptAt(INTERRUPT_EPOCH, INTERRUPT_BATCH)]
    )
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
        engine.fit(interrupted, datamodule=datamodule())
    checkpoints = list((tmp_path / "interrupted").rglob(INTERRUPTED_CHECKPOINT))
    assert len(checkpoints) == 1, "no resumable checkpoint was written on interrupt"
    steps_before = engine.trainer.global_step
    assert steps_before == INTERRUPT_EPOCH * BATCHES_PER_EPOCH + INTERRUPT_BATCH

    resumed_batches = RecordBatches()
    resumed = _resume(checkpoints[0], datamodule(), tmp_path / "resumed", resumed_batches)
    assert resumed.trainer.global_step == straight.trainer.global_step
    assert resumed.trainer.current_epoch == straight.trainer.current_epoch

    # The resumed run trains on exactly the batches the straight run had left.
    assert len(resumed_batches.batches) == len(straight_batches.batches) - steps_before
    for want, got in zip(straight_batches.batches[steps_before:], resumed_batches.batches, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    for level_want, level_got in zip(straight.model.levels, resumed.model.levels, strict=True):
        torch.testing.assert_close(level_got.ref_features, level_want.ref_features, rtol=0, atol=0)
    want_state, got_state = _state(straight), _state(resumed)
    assert want_state.keys() == got_state.keys()
    for name, want in want_state.items():
        torch.testing.assert_close(got_state[name], want, rtol=0, atol=0, msg=f"{name} differs after resuming")
    opt_want = straight.trainer.optimizers[0].state_dict()["state"]
    opt_got = resumed.trainer.optimizers[0].state_dict()["state"]
    for index, want in opt_want.items():
        for key, value in want.items():
            torch.testing.assert_close(opt_got[index][key], value, rtol=0, atol=0)


def test_epoch_seeded_sampler_order_depends_only_on_seed_and_epoch() -> None:
    """Same (seed, epoch): same permutation whatever the global RNG; skip drops a prefix once."""
    from anomalib_fod.callbacks import EpochSeededSampler

    data = list(range(10))
    torch.manual_seed(1)
    first = list(EpochSeededSampler(data, seed=5, epoch=2))
    torch.manual_seed(2)
    again = EpochSeededSampler(data, seed=5, epoch=2, skip=6)
    assert sorted(first) == data
    assert list(again) == first[6:]
    assert list(again) == first, "skip must apply to one iteration only"
    again.set_epoch(3)
    assert list(again) != first and sorted(again) == data
