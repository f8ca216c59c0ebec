"""Training callbacks: an interrupted run leaves a checkpoint, and resuming it replays the run exactly."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

logger = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


class EpochSeededSampler(RandomSampler):
    """A random order that depends only on ``(seed, epoch)``, able to skip a consumed prefix.

    PyTorch's ``RandomSampler`` draws each epoch's order from the global RNG, whose state at an
    epoch start is the product of everything that ran before; a resumed process cannot rebuild it.
    Here the order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``(seed, e)``,
    and ``skip`` drops the samples an interrupted epoch had already trained on, so a resumed run
    sees exactly the batches the uninterrupted one would have. It stays a ``RandomSampler`` so
    Lightning still recognises the loader as shuffled (and swaps in a ``DistributedSampler``, which
    is seeded per epoch as well, under DDP). ``set_epoch`` is called by Lightning at every epoch.

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed of the order.
        epoch: the epoch the next iteration belongs to.
        skip: number of leading samples to drop on the next iteration only.
    """

    def __init__(self, data_source: Sized, seed: int, epoch: int = 0, skip: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = epoch
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (a new epoch never skips)."""
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The full sample order of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data_source), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        yield from self.order(self.epoch)[skip:]


class ResumableInterruptCallback(Callback):
    """Save ``interrupted.ckpt`` on Ctrl-C or SIGTERM, and make resuming it replay the same batches.

    Lightning shuts down gracefully on ``KeyboardInterrupt`` and on its ``SIGTERMException`` but
    keeps only the checkpoints of finished epochs. This writes the full training state at the
    moment of the interrupt (weights, reference buffers, optimizer, loop progress) to
    ``<checkpoint dir>/interrupted.ckpt`` and logs the path; ``--ckpt_path`` on it resumes.

    For the resumed run to match an uninterrupted one, the training data order must not depend on
    the process's RNG history: the datamodule's shuffled training loader is rebuilt around an
    :class:`EpochSeededSampler` whose seed is drawn once (from the seeded global RNG) and stored
    in the checkpoint. On a mid-epoch resume the sampler skips the batches already trained on.
    Loaders that do not shuffle with a plain ``RandomSampler`` are left as they are.
    """

    def __init__(self) -> None:
        self.data_order_seed: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """The data-order seed travels with the checkpoint."""
        return {"data_order_seed": self.data_order_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data-order seed of the interrupted run."""
        self.data_order_seed = state_dict.get("data_order_seed")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Route the datamodule's training loader through :meth:`_reseeded`."""
        del pl_module
        datamodule = getattr(trainer, "datamodule", None)
        if stage != "fit" or datamodule is None:
            return
        original: Callable[[], Any] = datamodule.train_dataloader
        if getattr(original, "_fod_epoch_seeded", False):
            return

        def train_dataloader() -> Any:  # noqa: ANN401 - whatever the datamodule returns
            return self._reseeded(original(), trainer)

        train_dataloader._fod_epoch_seeded = True  # type: ignore[attr-defined]
        datamodule.train_dataloader = train_dataloader

    def _reseeded(self, loader: Any, trainer: Trainer) -> Any:  # noqa: ANN401
        """``loader`` with an :class:`EpochSeededSampler` positioned where the fit loop stands."""
        if not isinstance(loader, DataLoader) or type(loader.sampler) is not RandomSampler:
            return loader
        sampler = loader.sampler
        if sampler.replacement or sampler._num_samples is not None or type(loader.batch_sampler) is not BatchSampler:
            return loader
        if self.data_order_seed is None:
            self.data_order_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        epoch, batches_done = _fit_position(trainer)
        seeded = EpochSeededSampler(loader.dataset, self.data_order_seed, epoch, batches_done * loader.batch_size)
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=seeded,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Write the resumable checkpoint when training is interrupted."""
        del pl_module
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not trainer.training:
            return
        checkpointer = trainer.checkpoint_callback
        directory = Path(checkpointer.dirpath if checkpointer and checkpointer.dirpath else trainer.default_root_dir)
        path = directory / INTERRUPTED_CHECKPOINT
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            logger.warning("Training interrupted: resumable checkpoint written to %s (resume with --ckpt_path).", path)


def _fit_position(trainer: Trainer) -> tuple[int, int]:
    """``(epoch, batches already trained in it)`` of the fit loop when its loader is built.

    The loader is requested before Lightning classifies its restart, so this reads the restored
    progress counters: an epoch that was started but not processed is a mid-epoch restart.
    """
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress
    epoch = epochs.current.processed
    mid_epoch = fit_loop.restarting and epochs.total.started == epochs.total.ready == epochs.total.processed + 1
    batches_done = fit_loop.epoch_loop.batch_progress.current.completed if mid_epoch else 0
    return epoch, batches_done
