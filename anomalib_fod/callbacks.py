"""Training callbacks: an interrupted run leaves a checkpoint it can be resumed from."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

logger = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


class ResumableInterruptCallback(Callback):
    """Save ``interrupted.ckpt`` when training is stopped with Ctrl-C or SIGTERM.

    Lightning shuts down gracefully on ``KeyboardInterrupt`` and on its ``SIGTERMException`` but
    keeps only the checkpoints of finished epochs. This writes the full training state at the
    moment of the interrupt (weights, reference buffers, optimizer, loop progress) to
    ``<checkpoint dir>/interrupted.ckpt`` and logs the path; ``--ckpt_path`` on it resumes.
    """

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
