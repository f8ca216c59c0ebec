"""Opt-in resumable training: interrupted training leaves a checkpoint, resuming reproduces the uninterrupted run.

Without the callback, the datamodule's loader and sampler reach training untouched.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from lightning.fabric.utilities.data import _replace_dunder_methods
from torch.utils.data import DataLoader, RandomSampler

from anomalib_fod import Fod
from anomalib_fod.callbacks import INTERRUPTED_CHECKPOINT, EpochSeededSampler, ResumableInterruptCallback

from conftest import TINY, TRAIN_BATCH, make_datamodule, make_engine


class InterruptAt(Callback):
    """Simulate Ctrl-C just before training batch ``batch_idx`` of ``epoch``."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            raise KeyboardInterrupt


class RecordBatches(Callback):
    """Record the image batches a run trains on (to compare data orders) and the training sampler."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self.sampler = None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.sampler = trainer.train_dataloader.sampler

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches.append(batch.image.detach().clone())


# The context score trains its predictors after the Transformers, on batches it draws at random.
CONTEXT = {"context_score": True, "context_steps": 4, "context_radius": 1, "nearest_tokens": 0}


def _model(cache_features: bool, context: bool = False) -> Fod:
    settings = {**TINY, **(CONTEXT if context else {})}
    return Fod(pre_trained=False, image_size=64, visualizer=False, cache_features=cache_features, **settings)


def _state(model: Fod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _resume(  # noqa: PLR0913
    checkpoint: Path, datamodule, root: Path, recorder: RecordBatches, cache_features: bool, context: bool  # noqa: ANN001
) -> Fod:
    seed_everything(999)  # a different RNG history than the interrupted process had
    resumed = _model(cache_features, context)
    engine = make_engine(root, max_epochs=EPOCHS, callbacks=[recorder, ResumableInterruptCallback()])
    engine.fit(resumed, datamodule=datamodule, ckpt_path=checkpoint)
    return resumed


EPOCHS = 3
# 10 images in batches of 3: 4 batches per epoch; interrupt with 2 of epoch 1 done.
INTERRUPT_EPOCH, INTERRUPT_BATCH, BATCHES_PER_EPOCH = 1, 2, 4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cache_features", "context"),
    [(False, False), (True, False), (False, True)],
    ids=["cache-off", "cache-on", "context"],
)
def test_resumed_run_matches_the_uninterrupted_run(
    dummy_dataset: Path, tmp_path: Path, cache_features: bool, context: bool
) -> None:
    """Ctrl-C mid-epoch leaves interrupted.ckpt; resuming it reproduces the uninterrupted run exactly.

    The resumed process is seeded differently, yet it trains on the same remaining batches in the
    same order and ends with bit-identical weights, reference features and optimizer state, with
    the feature cache off and on (the resumed process rebuilds the cache it does not inherit), and with the context
    score, whose predictors train after the Transformers on batches they draw.
    """
    root, category = dummy_dataset.parent, dummy_dataset.name

    def datamodule():  # noqa: ANN202
        return make_datamodule(root, category, TRAIN_BATCH, 4)

    seed_everything(7)
    straight = _model(cache_features, context)
    straight_batches = RecordBatches()
    straight_data = datamodule()
    make_engine(
        tmp_path / "straight", max_epochs=EPOCHS, callbacks=[straight_batches, ResumableInterruptCallback()]
    ).fit(straight, datamodule=straight_data)
    assert isinstance(straight_batches.sampler, EpochSeededSampler)
    assert "train_dataloader" not in vars(straight_data), "the datamodule keeps the callback's loader after the fit"

    seed_everything(7)
    interrupted = _model(cache_features, context)
    engine = make_engine(
        tmp_path / "interrupted",
        max_epochs=EPOCHS,
        callbacks=[InterruptAt(INTERRUPT_EPOCH, INTERRUPT_BATCH), ResumableInterruptCallback()],
    )
    interrupted_data = datamodule()
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
        engine.fit(interrupted, datamodule=interrupted_data)
    assert "train_dataloader" not in vars(interrupted_data), "an interrupted fit keeps the callback's loader"
    checkpoints = list((tmp_path / "interrupted").rglob(INTERRUPTED_CHECKPOINT))
    assert len(checkpoints) == 1, "no resumable checkpoint was written on interrupt"
    steps_before = engine.trainer.global_step
    assert steps_before == INTERRUPT_EPOCH * BATCHES_PER_EPOCH + INTERRUPT_BATCH

    resumed_batches = RecordBatches()
    resumed = _resume(checkpoints[0], datamodule(), tmp_path / "resumed", resumed_batches, cache_features, context)
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


@pytest.mark.slow
def test_without_the_callback_training_gets_the_datamodules_own_loader(dummy_dataset: Path, tmp_path: Path) -> None:
    """Not opted in: the datamodule's RandomSampler trains, and an interrupt writes no checkpoint."""
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, TRAIN_BATCH, 4)
    recorder = RecordBatches()
    engine = make_engine(tmp_path, max_epochs=EPOCHS, callbacks=[recorder, InterruptAt(0, 1)])
    with pytest.raises(SystemExit):
        engine.fit(_model(cache_features=False), datamodule=datamodule)
    assert type(recorder.sampler) is RandomSampler
    assert not list(tmp_path.rglob(INTERRUPTED_CHECKPOINT))


def test_epoch_seeded_sampler_order_depends_only_on_seed_and_epoch() -> None:
    """Same (seed, epoch): same permutation whatever the global RNG; a resume point drops a prefix once."""
    data = list(range(10))
    torch.manual_seed(1)
    first = list(EpochSeededSampler(data, seed=5, epoch=2))
    torch.manual_seed(2)
    again = EpochSeededSampler(data, seed=5, epoch=2)
    again.resume_at(epoch=2, samples_done=6)
    assert sorted(first) == data
    assert list(again) == first[6:]
    assert list(again) == first, "the resume point must apply to one iteration only"
    other_epoch = EpochSeededSampler(data, seed=5, epoch=3)
    other_epoch.resume_at(epoch=2, samples_done=6)
    assert len(list(other_epoch)) == len(data), "a resume point applies to its own epoch only"
    again.set_epoch(3)
    assert list(again) != first and sorted(again) == data


class LoaderWithTag(DataLoader):
    """A DataLoader subclass with an argument of its own, as a user's datamodule may return."""

    def __init__(self, dataset, tag: str, **kwargs) -> None:  # noqa: ANN001
        self.tag = tag
        super().__init__(dataset, **kwargs)


class TinyDataModule:
    """Only what the callback touches: ``train_dataloader``."""

    def __init__(self, size: int = 10) -> None:
        self.data = list(range(size))

    def train_dataloader(self) -> DataLoader:
        # Lightning records a loader's arguments while it asks the datamodule for it (as in a fit).
        with _replace_dunder_methods(DataLoader, "dataset"):
            return LoaderWithTag(self.data, "mine", batch_size=3, shuffle=True, in_order=False, drop_last=True)


def test_the_callback_rebuilds_the_loader_whole_and_gives_the_datamodule_back() -> None:
    """During the fit: the same loader class and arguments, a seeded sampler; after it (normal end or an
    exception): the datamodule's own method again, nothing left on the instance."""
    for ending in ("teardown", "on_exception"):
        datamodule = TinyDataModule()
        trainer = SimpleNamespace(datamodule=datamodule, current_epoch=0, training=False)
        callback = ResumableInterruptCallback(seed=3)
        callback.setup(trainer, None, "fit")
        loader = datamodule.train_dataloader()
        assert type(loader) is LoaderWithTag and loader.tag == "mine"
        assert (loader.batch_size, loader.drop_last, loader.in_order) == (3, True, False)
        assert isinstance(loader.sampler, EpochSeededSampler)
        assert [int(i) for batch in loader for i in batch] == EpochSeededSampler(datamodule.data, 3, 0).order(0)[:9]
        if ending == "teardown":
            callback.teardown(trainer, None, "fit")
        else:
            callback.on_exception(trainer, None, RuntimeError("boom"))
        assert "train_dataloader" not in vars(datamodule)
        assert type(datamodule.train_dataloader().sampler) is RandomSampler


def test_the_callback_puts_back_a_loader_function_the_user_set_on_the_instance() -> None:
    datamodule = TinyDataModule()
    own = datamodule.train_dataloader
    datamodule.train_dataloader = own  # the user's own instance attribute
    trainer = SimpleNamespace(datamodule=datamodule, current_epoch=0, training=False)
    callback = ResumableInterruptCallback(seed=3)
    callback.setup(trainer, None, "fit")
    assert datamodule.train_dataloader is not own
    callback.teardown(trainer, None, "fit")
    assert vars(datamodule)["train_dataloader"] is own
