"""The Lightning callbacks ``Fod`` trains with: when its passes over the training images run (``fitting.py``).

- :class:`ReferenceFeatureCallback`: the reference features, once when training starts, before the first
  optimisation step. When training resumes from a checkpoint (``ckpt_path``) that already holds
  references, they are kept as they are, so a resumed run matches an uninterrupted one.
- :class:`ResidualStatisticsCallback`: the residual statistics, whenever the scoring needs them and the
  weights have changed since the last fit: before each validation of a fit (anomalib's post-processor
  learns its thresholds from validation scores) and at the end of training.
- :class:`ValidateWhenTrainingStops`: a model that stops itself after ``training_steps`` validates once, in the
  epoch it stops in, instead of after every epoch before it (whose thresholds, and the statistics fitted for
  them, the last validation replaces).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from anomalib_fod.utils import check_choice

from .fitting import TrainingImages, distributed_sum, fit_reference, fit_residual_statistics, rank_batches
from .nearest import decline_unmeasured, describe_choice
from .residual_statistics import per_position_bytes
from .settings import ReferenceMode

if TYPE_CHECKING:
    import torch

    from .torch_model import FodModel

logger = logging.getLogger(__name__)

# Largest float64 sums of per-position outer products (L, C, C) the fit may hold, over all levels.
# EfficientNet-Lite0 at 256x256 needs 39 MiB and at 1024x1024 620 MiB; WideResNet50 (512 and 1024
# channels) needs 4 GiB at 256x256, which belongs in a shared covariance, not in a checkpoint.
PER_POSITION_BUDGET_BYTES = 1 << 30
# The context score's fit keeps every training token at every gain in CPU memory (``fitting.fit_context``); the
# nearest-token score's keeps those of a random share of the images that fits in it.
CONTEXT_BUDGET_BYTES = 8 << 30
# Fewest training images a nearest-token fit over the budget may keep: its z-units are moments over held-out folds of
# the kept images. Fitted on a quarter of the shared datasets' images (256 px, 3 seeds), 65-80 kept images moved AUROC
# by 0.001 on average; 9 (battery_weld) cost 0.05 pixel AUROC, far more than leaving the score out. Below this the
# score is left out.
MIN_KEPT_IMAGES = 32


def training_transform(pl_module: LightningModule) -> torch.nn.Module | None:
    """The pre-processor's transform, which the training steps see their images through."""
    pre_processor = getattr(pl_module, "pre_processor", None)
    return getattr(pre_processor, "transform", None) if pre_processor else None


def training_images(trainer: Trainer, pl_module: LightningModule) -> TrainingImages:
    """This process's share of the fit's training images, pre-processed as the training steps see them."""
    batches, weight = rank_batches(trainer)
    return TrainingImages(
        batches,
        training_transform(pl_module),
        pl_module.device,
        progress=trainer.is_global_zero,
        reduce=distributed_sum(trainer),
        weight=weight,
        seed=getattr(pl_module, "draw_seed", None),
    )


def kept_token_share(model: FodModel, count: int) -> float:
    """The share of ``count`` training images whose tokens the nearest-token fit keeps within ``CONTEXT_BUDGET_BYTES``
    (1: all; also where the grids are not known yet, before the references): the context and nearest-token scores'
    fits keep three float32 copies of every kept token at every gain. Where the budget keeps fewer than
    ``MIN_KEPT_IMAGES`` images, a self-choosing nearest-token score is left out (with a warning; 1 is returned,
    nothing is kept) and a required one refused, as a context score over the budget is (its predictors learn from
    all)."""
    option = model.anomaly_map_generator.keeps_training_tokens
    grids = model.reference_grids
    if option is None or not all(h * w for h, w in grids):
        return 1.0
    images = count * len(model.settings.intensity_gains)
    channels = model.feature_extractor.channels
    size = 3 * 4 * images * sum(h * w * c for (h, w), c in zip(grids, channels, strict=True))
    if size <= CONTEXT_BUDGET_BYTES:
        return 1.0
    share = CONTEXT_BUDGET_BYTES / size
    if option == "nearest_tokens":
        if share * count >= MIN_KEPT_IMAGES:
            logger.info(
                "FOD nearest-token score: keeping every training token would take %.1f GiB of CPU memory (%d images "
                "at every intensity gain on grids %s); its bank and z-units are fitted on a random %.3f of the images.",
                size / 2**30, images, grids, share,
            )
            return share
        if model.settings.nearest_chooses:
            decline_unmeasured(
                model.anomaly_map_generator.nearest,
                f"the {size / 2**30:.1f} GiB of CPU memory its fit would take to keep every training token ({images} "
                f"images at every intensity gain on grids {grids}) leave room for fewer than {MIN_KEPT_IMAGES} images",
            )
            return 1.0
    msg = (
        f"{option} keeps every training token at every intensity gain while it fits: {images} images "
        f"on grids {grids} need {size / 2**30:.1f} GiB of CPU memory"
        + (f", and fewer than {MIN_KEPT_IMAGES} images fit in the budget" if option == "nearest_tokens" else "")
        + f". Use fewer training images or intensity_gains, a smaller image size, or turn {option} off."
    )
    raise ValueError(msg)


class ReferenceFeatureCallback(Callback):
    """Fill FOD's reference-feature buffers from the training set before training starts.

    Args:
        mode: ``"mean"`` or ``"coreset"``.
    """

    def __init__(self, mode: ReferenceMode = "mean") -> None:
        super().__init__()
        check_choice("reference", mode, ReferenceMode)
        self.mode = mode

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute the references (unless resuming with references already in the checkpoint)."""
        model: FodModel = pl_module.model
        if not model.with_inter:
            return
        if trainer.ckpt_path is not None and model.has_reference:
            logger.info("Resuming: keeping the reference features stored in %s", trainer.ckpt_path)
            return
        if self.mode == "coreset" and trainer.world_size > 1:
            msg = "reference='coreset' is single-device only; use reference='mean' with DDP."
            raise RuntimeError(msg)
        fit_reference(model, training_images(trainer, pl_module), self.mode)


def map_level_fits(pl_module: LightningModule, setting: str, what: str, used: int, needed: int) -> bool:
    """Whether a map-only level's per-position covariances (``needed`` bytes, of ``what``) fit the budget beside the
    levels' ``used`` bytes. Where they do not, a share asked for (``setting`` among the hyper-parameters) is refused
    before the first step, and one left to the model steps aside with a warning: a default must not refuse images a
    model without it takes."""
    if used + needed <= PER_POSITION_BUDGET_BYTES:
        return True
    if pl_module.hparams.get(setting) is not None:
        msg = (
            f"{setting}={getattr(pl_module.model.settings, setting)} keeps one covariance per position of {what}: "
            f"{needed / 2**30:.1f} GiB, over the budget with the levels' {used / 2**30:.1f} GiB; use {setting}=0, a "
            "smaller image size or a backbone with fewer channels."
        )
        raise ValueError(msg)
    rank_zero_warn(
        f"FOD: {setting}'s map level would keep {needed / 2**30:.1f} GiB of per-position covariances of {what}, over "
        f"the budget with the levels' {used / 2**30:.1f} GiB: the anomaly map is made without it."
    )
    pl_module.set_scoring(**{setting: 0.0})
    return False


class ResidualStatisticsCallback(Callback):
    """Fit the residual statistics on the training set when the scoring needs them and the weights changed.

    Before every validation of a fit (the post-processor learns its thresholds from validation scores)
    and at the end of training, if an optimizer step has happened since the last fit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fitted_at_step: int | None = None
        # share of the training images whose tokens the nearest-token fit keeps (set when training starts)
        self.keep_share = 1.0

    def refresh(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fit now if the scoring needs the statistics and an optimizer step has happened since the last fit."""
        model: FodModel = pl_module.model
        if not model.anomaly_map_generator.needs_statistics or self.fitted_at_step == trainer.global_step:
            return
        # The context predictor reads the frozen features alone: trained once per fit, its z-units refitted.
        first = self.fitted_at_step is None
        images = replace(training_images(trainer, pl_module), keep_share=self.keep_share)
        fit_residual_statistics(model, images, train_context=first)
        self.fitted_at_step = trainer.global_step
        nearest = model.anomaly_map_generator.nearest
        # the choice the model made on the training images, on the console once per fit
        if first and len(nearest) and model.anomaly_map_generator.nearest_applies:
            rank_zero_info(describe_choice(nearest, model.settings.nearest_position_limit))
        if first and model.anomaly_map_generator.aligned is not None:
            rank_zero_info(model.anomaly_map_generator.aligned.describe())
        if first and model.anomaly_map_generator.fine is not None:
            rank_zero_info(
                f"FOD: the anomaly map gives a share of {model.anomaly_map_generator.fine.weight:g} to the backbone's "
                f"{model.feature_extractor.map_layer}, a map-only level at half the finest level's stride (in units of "
                "the training maps' spread; fine_map_weight=0 leaves it out)."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse, before any step, statistics too large to keep (the grids are known by now)."""
        model: FodModel = pl_module.model
        grids = model.reference_grids
        if not all(h * w for h, w in grids):  # no references (with_inter=False): the grid is known only later
            return
        dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
        self.keep_share = 1.0 if dataset is None else kept_token_share(model, len(dataset))
        generator = model.anomaly_map_generator
        if not generator.needs_statistics:
            return
        extractor = model.feature_extractor
        size = 0
        if any(s.per_position for s in generator.statistics):
            size = per_position_bytes(grids, extractor.channels)
            if size > PER_POSITION_BUDGET_BYTES:
                msg = (
                    f"residual_covariance={model.settings.residual_covariance!r} with image_score="
                    f"{model.settings.image_score!r} needs {size / 2**30:.1f} GiB for one "
                    f"covariance per token position (grids {grids}, backbone channels "
                    f"{list(extractor.channels)}); use residual_covariance='shared' and image_score='map' "
                    "(one covariance per level), a smaller image size or a backbone with fewer channels."
                )
                raise ValueError(msg)
        if generator.aligned is not None:  # the finest level's grid and channels, one covariance per position
            what = f"the finest level unpooled ({grids[0][0]}x{grids[0][1]} grid, {extractor.channels[0]} channels)"
            aligned_size = per_position_bytes(grids[:1], extractor.channels[:1])
            if map_level_fits(pl_module, "aligned_map_weight", what, size, aligned_size):
                size += aligned_size
        if generator.fine is not None:  # its stage has half the finest level's stride: twice its grid per side
            fine_grid = (2 * grids[0][0], 2 * grids[0][1])
            what = (
                f"the backbone's {extractor.map_layer} ({extractor.map_channels} channels on a {fine_grid[0]}x"
                f"{fine_grid[1]} grid)"
            )
            map_level_fits(
                pl_module, "fine_map_weight", what, size, per_position_bytes([fine_grid], [extractor.map_channels])
            )

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refit before validation scores the images (only during fit: test and predict use what is stored)."""
        if trainer.state.fn == "fit":
            self.refresh(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refit after the last step (a run without validation still leaves a usable model)."""
        self.refresh(trainer, pl_module)


class ValidateWhenTrainingStops(Callback):
    """Validate a self-stopping fit once, at the end of the epoch its ``training_steps`` budget ends in.

    Lightning validates after every ``check_val_every_n_epoch``-th epoch. FOD's budget is in optimizer steps, so on
    a training set smaller than the budget every earlier epoch would end with a validation (and a fit of the
    residual statistics for it) whose thresholds the last one replaces, and a run stopped mid-epoch would not
    validate at all in an epoch that validation is not due in (anomalib's thresholds would stay unset). For the
    fit only, the trainer's ``check_val_every_n_epoch`` becomes the number of that epoch; ``teardown`` puts the
    user's value back. A trainer that validates every so many steps (``check_val_every_n_epoch=None``), or whose
    ``check_val_every_n_epoch`` exceeds ``max_epochs`` (validation switched off), is left alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set validation to the epoch the step budget ends in (or the trainer's last epoch, if that comes first)."""
        budget = getattr(pl_module, "training_steps", None)
        batches = trainer.num_training_batches
        if budget is None or trainer.check_val_every_n_epoch is None or not math.isfinite(batches) or batches < 1:
            return
        last_epoch = trainer.max_epochs - 1 if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if last_epoch is not None and trainer.check_val_every_n_epoch > last_epoch + 1:
            return  # the user switched validation off for this fit: never switch it back on
        steps_per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        remaining = max(1, budget - trainer.global_step)
        stop_epoch = trainer.current_epoch + math.ceil(remaining / steps_per_epoch) - 1
        if last_epoch is not None:
            stop_epoch = min(stop_epoch, last_epoch)
        self._saved = trainer.check_val_every_n_epoch
        # Lightning validates after epoch e when (e + 1) % n == 0: with n = stop_epoch + 1, first after stop_epoch.
        trainer.check_val_every_n_epoch = stop_epoch + 1

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give the trainer its own ``check_val_every_n_epoch`` back."""
        del pl_module, stage
        if self._saved is not None:
            trainer.check_val_every_n_epoch = self._saved
            self._saved = None
