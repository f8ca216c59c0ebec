"""Resuming a cell whose process died during training, instead of training it again from scratch.

A FOD or ED cell trains for hours on a CPU; a killed session, an OOM kill or a timeout used to
throw all of it away. Now every cell writes ``work/<cell>/resume.ckpt`` at the end of each
training epoch (a full Lightning checkpoint: weights, reference buffers, optimizer, loop progress,
data-order seed, the test curve so far) and a rerun of the benchmark resumes from it. With the
epoch-seeded data order of :class:`~anomalib_fod.callbacks.ResumableInterruptCallback` the resumed
fit sees the same batches as an uninterrupted one, so its result is the same.

A checkpoint is resumed only when it belongs to the cell's current settings: it carries the cell
fingerprint, and one written for other settings is ignored (and deleted). Its cumulative fit time
travels with it, so ``fit_s`` still counts every epoch, whichever process trained it.

Checkpoints written before this existed (the engine's own ``model.ckpt``, saved after the last
epoch) carry no fingerprint and no fit time. Such a checkpoint is *adopted* only when the
hyper-parameters stored in it equal those of the model the cell builds, the result then says
``"adopted"`` and its ``fit_s`` is unknown (NaN) rather than guessed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from anomalib_fod.callbacks import INTERRUPTED_CHECKPOINT

logger = logging.getLogger(__name__)

RESUME_CHECKPOINT = "resume.ckpt"


class CellCheckpoint(pl.Callback):
    """Write ``path`` (atomically) after every training epoch, stamped with the cell fingerprint.

    Its state (fingerprint, cumulative fit seconds) is saved in every checkpoint the trainer
    writes, the engine's final ``model.ckpt`` and an ``interrupted.ckpt`` included.

    Args:
        path: where the per-epoch checkpoint goes (``work/<cell>/resume.ckpt``).
        fingerprint: the cell's settings hash (:meth:`CellSpec.fingerprint`).
    """

    def __init__(self, path: Path, fingerprint: str) -> None:
        super().__init__()
        self.path = path
        self.fingerprint = fingerprint
        self.seconds_before = 0.0
        self.started = time.perf_counter()

    def start(self) -> None:
        """Start this process's part of the clock (call right before ``fit``)."""
        self.started = time.perf_counter()

    @property
    def seconds_here(self) -> float:
        """Wall seconds of fitting in this process."""
        return time.perf_counter() - self.started

    @property
    def fit_seconds(self) -> float:
        """Wall seconds of fitting so far, over every process that trained this cell."""
        return self.seconds_before + self.seconds_here

    def state_dict(self) -> dict[str, Any]:
        """Fingerprint and cumulative fit seconds, stored in the checkpoint."""
        return {"fingerprint": self.fingerprint, "fit_seconds": self.fit_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the fit clock of the checkpoint (its fingerprint was checked before resuming)."""
        self.seconds_before = float(state_dict["fit_seconds"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the full training state; a crash while writing leaves the previous one intact."""
        del pl_module
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial)
        os.replace(partial, self.path)
        # The cell log's progress line: a long fit otherwise shows nothing for hours.
        print(
            f"[cell] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} trained, "
            f"{self.fit_seconds:.0f} s of fitting so far, resumable from {self.path.name}",
            flush=True,
        )


@dataclass(frozen=True)
class ResumePoint:
    """Where a cell's fit continues from.

    Attributes:
        checkpoint: the checkpoint handed to ``Engine.fit(ckpt_path=...)``.
        global_step: optimizer steps already trained.
        epochs_done: training epochs the checkpoint holds.
        fit_s_before: fit seconds already spent, ``None`` when unknown (an adopted checkpoint).
        adopted: ``True`` for a checkpoint without fingerprint whose hyper-parameters matched.
    """

    checkpoint: Path
    global_step: int
    epochs_done: int
    fit_s_before: float | None
    adopted: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for the cell's result."""
        return {
            "checkpoint": str(self.checkpoint),
            "global_step": self.global_step,
            "epochs_done": self.epochs_done,
            "fit_s_before": self.fit_s_before,
            "adopted": self.adopted,
        }


def _state_key() -> str:
    return CellCheckpoint.__qualname__


def _epochs_done(checkpoint: dict[str, Any]) -> int:
    """Training epochs whose every batch is in the checkpoint.

    Ours, written at ``on_train_epoch_end``, already count their epoch as processed (not yet as
    completed). The engine's, written by the validation after the last batch, count it as
    neither, though every batch of it is done.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = fit_loop.get("epoch_progress", {}).get("current", {})
    processed, completed = int(epochs.get("processed", 0)), int(epochs.get("completed", 0))
    last_batch_done = bool(fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", False))
    return processed + int(last_batch_done and processed == completed)


def _candidates(work_dir: Path) -> list[Path]:
    """Checkpoints a previous process of this cell may have left: per-epoch, interrupt, engine's."""
    paths = [work_dir / RESUME_CHECKPOINT]
    engine_dir = work_dir / "engine"
    if engine_dir.is_dir():
        paths += sorted(engine_dir.glob(f"**/weights/lightning/{INTERRUPTED_CHECKPOINT}"))
        paths += sorted(engine_dir.glob("**/weights/lightning/model.ckpt"))
    return [path for path in paths if path.is_file()]


def find_resume_point(work_dir: Path, fingerprint: str, hparams: dict[str, Any]) -> ResumePoint | None:
    """The most advanced checkpoint of this cell that may be resumed, or ``None``.

    Args:
        work_dir: the cell's scratch folder.
        fingerprint: the cell's current settings hash.
        hparams: the plain hyper-parameters of the model the cell builds (for adopting
            checkpoints written before fingerprints existed).
    """
    best: ResumePoint | None = None
    for path in _candidates(work_dir):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as error:  # noqa: BLE001 - a truncated file is not a resume point
            logger.warning("ignoring unreadable checkpoint %s: %s", path, error)
            continue
        state = checkpoint.get("callbacks", {}).get(_state_key())
        if state is not None:
            if state.get("fingerprint") != fingerprint:
                logger.info("ignoring %s: written for other settings of this cell", path)
                continue
            fit_s_before, adopted = float(state["fit_seconds"]), False
        else:
            saved = {key: checkpoint.get("hyper_parameters", {}).get(key) for key in hparams}
            if _plain(saved) != _plain(hparams):
                logger.info("ignoring %s: no cell fingerprint and other hyper-parameters", path)
                continue
            fit_s_before, adopted = None, True
        point = ResumePoint(path, int(checkpoint.get("global_step", 0)), _epochs_done(checkpoint), fit_s_before, adopted)
        # Prefer more training; on a tie, a checkpoint that knows its fit time.
        if best is None or (point.global_step, not point.adopted) > (best.global_step, not best.adopted):
            best = point
    return best


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def discard_resume_state(work_dir: Path) -> None:
    """Delete a cell's resume checkpoints (``--force``, or after the cell finished)."""
    for path in (work_dir / RESUME_CHECKPOINT, work_dir / (RESUME_CHECKPOINT + ".partial")):
        path.unlink(missing_ok=True)
    engine_dir = work_dir / "engine"
    if engine_dir.is_dir():
        for path in engine_dir.glob(f"**/weights/lightning/{INTERRUPTED_CHECKPOINT}"):
            path.unlink()


def discard_training(work_dir: Path) -> None:
    """Delete everything a previous fit of the cell left (``--force``, or its settings changed)."""
    discard_resume_state(work_dir)
    shutil.rmtree(work_dir / "engine", ignore_errors=True)
