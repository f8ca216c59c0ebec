"""Opt-in resumable training: an interrupted run leaves a checkpoint, and resuming it replays the run exactly.

Nothing here is attached by default: add :class:`ResumableInterruptCallback` to the trainer's
callbacks (``Engine(callbacks=[ResumableInterruptCallback()])``, or
``--trainer.callbacks+=anomalib_fod.callbacks.ResumableInterruptCallback`` on the CLI) to have
Ctrl-C write a checkpoint that resumes bit for bit. Without it, the training loader and its
sampler are exactly what the datamodule made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

logger = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
_ABSENT = object()


class EpochSeededSampler(RandomSampler):
    """A random order that depends only on ``(seed, epoch)``, able to skip a consumed prefix.

    PyTorch's ``RandomSampler`` draws each epoch's order from the global RNG, whose state at an
    epoch start is the product of everything that ran before; a resumed process cannot rebuild it.
    Here the order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``(seed, e)``.
    :meth:`resume_at` drops the samples an interrupted epoch had already trained on, once, so a
    resumed run sees exactly the batches the uninterrupted one would have. It stays a
    ``RandomSampler`` so Lightning still recognises the loader as shuffled (and swaps in a
    ``DistributedSampler``, which is seeded per epoch as well, under DDP). Lightning calls
    ``set_epoch`` at every epoch start.

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed of the order.
        epoch: the epoch the next iteration belongs to.
    """

    def __init__(self, data_source: Sized, seed: int, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = epoch
        self._skip_epoch: int | None = None
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``samples_done`` samples (once)."""
        self._skip_epoch, self._skip = epoch, samples_done

    def order(self, epoch: int) -> list[int]:
        """The full sample order of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data_source), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip = self._skip if self._skip_epoch == self.epoch else 0
        self._skip_epoch, self._skip = None, 0
        yield from self.order(self.epoch)[skip:]


def epoch_seeded_loader(loader: DataLoader, seed: int, epoch: int) -> DataLoader | None:
    """``loader`` rebuilt around an :class:`EpochSeededSampler`, or ``None`` if it is not a plain shuffled loader.

    Only a loader that shuffles with a plain ``RandomSampler`` (no replacement, every sample once)
    and the default ``BatchSampler`` is rebuilt; anything custom is the user's and is left alone.
    The rebuild is Lightning's own (the one that puts a ``DistributedSampler`` into a loader under
    DDP): the same ``DataLoader`` class with every argument it was built with, only the sampler new.
    A loader that cannot be rebuilt so (a subclass whose arguments Lightning did not record) is
    left alone too, with a warning.
    """
    sampler = loader.sampler
    if type(sampler) is not RandomSampler or type(loader.batch_sampler) is not BatchSampler:
        return None
    if sampler.replacement or sampler.num_samples != len(loader.dataset):
        return None
    try:
        return _update_dataloader(loader, EpochSeededSampler(loader.dataset, seed, epoch))
    except (MisconfigurationException, TypeError) as error:
        logger.warning(
            "ResumableInterruptCallback: the training loader (%s) cannot be rebuilt with a seeded sampler (%s); "
            "it is used as it is, and a resumed run may see the data in another order.",
            type(loader).__name__,
            error,
        )
        return None


class ResumableInterruptCallback(OnExceptionCheckpoint):
    """Write ``interrupted.ckpt`` on Ctrl-C or SIGTERM, and make resuming it replay the same batches.

    Lightning's :class:`~lightning.pytorch.callbacks.OnExceptionCheckpoint`, narrowed to an
    interrupted *training* (Ctrl-C, or the ``SIGTERMException`` Lightning raises on SIGTERM) and
    writing next to the epoch checkpoints by default. ``--ckpt_path .../interrupted.ckpt`` resumes.
    As in Lightning, a run that ends normally removes its own ``interrupted.ckpt``.

    For the resumed run to match an uninterrupted one, the training data order must not depend on
    the process's RNG history: while the fit runs, the datamodule's shuffled training loader is
    rebuilt around an :class:`EpochSeededSampler` whose seed is drawn once (from the seeded global
    RNG); when the fit ends, normally or not, the datamodule is as it was. The seed and
    the number of batches trained in the current epoch are this callback's state, which Lightning
    saves in every checkpoint and restores on resume; a mid-epoch resume skips those batches.
    Loaders that do not shuffle with a plain ``RandomSampler``, and data passed to ``fit`` without a
    datamodule, are left as they are.

    Args:
        dirpath: folder of ``interrupted.ckpt``; ``None``: the checkpoint callback's folder (else
            the trainer's ``default_root_dir``), resolved when training starts.
        seed: seed of the data order; ``None``: drawn from the global RNG when the loader is built.
    """

    def __init__(self, dirpath: str | Path | None = None, seed: int | None = None) -> None:
        super().__init__(dirpath="" if dirpath is None else dirpath, filename=Path(INTERRUPTED_CHECKPOINT).stem)
        self.data_order_seed = seed
        self._epoch = 0
        self._batches_done = 0
        self._resume_point: tuple[int, int] | None = None
        self._wrapped: tuple[Any, Any] | None = None  # (datamodule, its own train_dataloader attribute or _ABSENT)

    def state_dict(self) -> dict[str, Any]:
        """The data-order seed and the position in the current epoch travel with the checkpoint."""
        return {"data_order_seed": self.data_order_seed, "epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data-order seed and where the checkpointed epoch stood."""
        self.data_order_seed = state_dict.get("data_order_seed")
        if "epoch" in state_dict:
            self._resume_point = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Route the datamodule's training loader through :func:`epoch_seeded_loader` for this fit.

        The datamodule's ``train_dataloader`` is wrapped on the instance only while the fit runs:
        :meth:`teardown` (or :meth:`on_exception`) puts back what was there before.
        """
        del pl_module
        datamodule = getattr(trainer, "datamodule", None)
        if stage != "fit" or datamodule is None or self._wrapped is not None:
            return
        original: Callable[[], Any] = datamodule.train_dataloader

        def train_dataloader() -> Any:  # noqa: ANN401 - whatever the datamodule returns
            return self._reseeded(original(), trainer)

        self._wrapped = (datamodule, vars(datamodule).get("train_dataloader", _ABSENT))
        datamodule.train_dataloader = train_dataloader

    def _unwrap(self) -> None:
        """Give the datamodule back its own ``train_dataloader``."""
        if self._wrapped is None:
            return
        datamodule, before = self._wrapped
        self._wrapped = None
        if before is _ABSENT:
            vars(datamodule).pop("train_dataloader", None)
        else:
            datamodule.train_dataloader = before

    def _reseeded(self, loader: Any, trainer: Trainer) -> Any:  # noqa: ANN401
        if not isinstance(loader, DataLoader):
            return loader
        if self.data_order_seed is None:
            self.data_order_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        seeded = epoch_seeded_loader(loader, self.data_order_seed, trainer.current_epoch)
        if seeded is None:
            return loader
        if self._resume_point is not None:
            epoch, batches_done = self._resume_point
            seeded.sampler.resume_at(epoch, batches_done * loader.batch_size)
        return seeded

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve the checkpoint folder (the checkpoint callback has set its own by now)."""
        del pl_module
        if not self.dirpath:
            checkpointer = trainer.checkpoint_callback
            self.dirpath = str(checkpointer.dirpath if checkpointer and checkpointer.dirpath else trainer.default_root_dir)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Count this epoch's batches from zero, or from where a resumed checkpoint stood."""
        del pl_module
        self._epoch = trainer.current_epoch
        self._batches_done = 0
        if self._resume_point is not None and self._resume_point[0] == self._epoch:
            self._batches_done = self._resume_point[1]
        self._resume_point = None

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """One more batch of this epoch is in the weights."""
        del args, kwargs
        self._batches_done += 1

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Write the resumable checkpoint when training is interrupted (not on other errors); Lightning skips
        ``teardown`` after an exception, so the datamodule gets its loader back here."""
        del pl_module
        self._unwrap()
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not trainer.training or not self.dirpath:
            return
        super().on_exception(trainer)
        if trainer.is_global_zero:
            logger.warning(
                "Training interrupted: resumable checkpoint written to %s (resume with --ckpt_path).", self.ckpt_path
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """After a normal end, give the datamodule its loader back and remove this run's ``interrupted.ckpt``
        (never a path not yet resolved)."""
        if stage == "fit":
            self._unwrap()
        if self.dirpath:
            super().teardown(trainer, pl_module, stage)
