"""A Gaussian model of the training images' reconstruction residuals: a scale-free reconstruction score.

FOD's reconstruction term compares a token ``x`` with its reconstruction ``x_hat``. Its MSE is as
large as the backbone's channels are (at stride 8 of EfficientNet-Lite0 it is in the tens and ranks
defects *below* normal tokens on some data), and ``1 - cos`` ignores how far a token moved. Both
ignore what the residual ``r = x - x_hat`` looks like on normal images. Here each level keeps, from
the training images after training, the mean residual of every token position ``mu_l`` ``(L, C)``
and one covariance of the residuals around those means ``Sigma`` ``(C, C)`` shared by all positions
(a few hundred images estimate one per position poorly), and a token is scored by its Mahalanobis
distance ``sqrt((r - mu_l)^T Sigma^-1 (r - mu_l))``: a residual is judged against the residuals the
model makes on normal images, channel by channel and with their correlations.

With ``residual_covariance="position"`` each position keeps its own covariance ``Sigma_l``
``(L, C, C)``, shrunk towards the shared one: ``(1 - w) Sigma_l + w Sigma`` with ``w = C / (N + C)``
for ``N`` training images (half the shared covariance when there are as many images as channels).
That helps where positions differ and images are aligned, and adds estimation noise where they do
not (benchmarks/RESULTS.md, issue 17). ``residual_covariance="blend"`` scores a token by the mean of
its two distances, under the shared and under its own position's covariance: most of the per-position
gain in image AUROC where parts are aligned, without its loss of localisation where they are not.

The statistics are buffers, so they are saved in checkpoints and become constants of an exported
graph, like the reference features. :class:`ResidualStatisticsCallback` fits them on the training
set whenever the scoring needs them and the weights have changed since the last fit (before each
validation, which sets anomalib's thresholds, and at the end of training).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, get_args

import torch
from anomalib.models.components import DynamicBufferMixin
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from .reference import iterate_pooled_features, rank_batches
from .settings import ResidualCovariance

if TYPE_CHECKING:
    from .torch_model import FodModel

logger = logging.getLogger(__name__)

# Added to the covariance's diagonal, as a share of its mean variance: keeps the inverse finite when
# the training images span fewer directions than there are channels.
SHRINKAGE = 0.01

# Largest float64 sums of per-position outer products (L, C, C) the fit may hold, over all levels.
# EfficientNet-Lite0 at 256x256 needs 39 MiB and at 1024x1024 620 MiB; WideResNet50 (512 and 1024
# channels) needs 4 GiB at 256x256, which belongs in a shared covariance, not in a checkpoint.
PER_POSITION_BUDGET_BYTES = 1 << 30


def per_position_bytes(grids: Iterable[tuple[int, int]], channels: Iterable[int]) -> int:
    """Bytes of the float64 ``(L, C, C)`` sums a per-position fit keeps for levels of these grids and channels."""
    return sum(8 * h * w * c * c for (h, w), c in zip(grids, channels, strict=True))


class ResidualStatistics(DynamicBufferMixin, nn.Module):
    """Per-position mean and precisions of one level's residuals; empty until fitted.

    Buffers: ``mean`` ``(L, C)``, ``precision`` ``(C, C)`` (of the covariance shared by all positions)
    and, unless ``covariance="shared"`` without ``keep_position``, ``position_precision`` ``(L, C, C)``
    (one per position).

    Args:
        covariance: which distance a token gets by default: under the shared covariance (``"shared"``),
            under its position's own (``"position"``) or the mean of the two (``"blend"``).
        keep_position: fit the per-position precisions even when ``covariance`` does not read them (they
            are asked for by name, e.g. for the image score: ``forward(residual, "position")``).
    """

    def __init__(self, covariance: ResidualCovariance = "shared", keep_position: bool = False) -> None:
        super().__init__()
        if covariance not in get_args(ResidualCovariance):
            msg = f"covariance must be one of {get_args(ResidualCovariance)}, got {covariance!r}."
            raise ValueError(msg)
        self.covariance = covariance
        self.keep_position = keep_position
        self.register_buffer("mean", torch.empty(0, 0))
        self.register_buffer("precision", torch.empty(0, 0))
        self.register_buffer("position_precision", torch.empty(0, 0, 0))

    @property
    def per_position(self) -> bool:
        """Whether the fit must keep one covariance per token position."""
        return self.covariance != "shared" or self.keep_position

    @property
    def fitted(self) -> bool:
        """Whether statistics have been fitted (or loaded)."""
        return self.mean.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:  # noqa: ANN001
        """Older checkpoints load: without statistics (empty, fit them to use them), or with the per-position
        precisions stored as ``precision`` ``(L, C, C)`` (moved to ``position_precision``)."""
        old = state_dict.get(prefix + "precision")
        if old is not None and old.dim() == 3 and prefix + "position_precision" not in state_dict:  # noqa: PLR2004
            state_dict[prefix + "position_precision"] = state_dict.pop(prefix + "precision")
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        for name in ("mean", "precision", "position_precision"):
            key = prefix + name
            if key in missing_keys and key not in before:
                missing_keys.remove(key)

    def set(self, mean: torch.Tensor, precision: torch.Tensor, position_precision: torch.Tensor | None = None) -> None:
        """Store ``(L, C)`` means, the shared ``(C, C)`` precision and the per-position ``(L, C, C)`` ones."""
        self.mean = mean.detach().float()
        self.precision = precision.detach().float()
        if position_precision is None:
            self.position_precision = torch.empty(0, 0, 0, device=mean.device)
        else:
            self.position_precision = position_precision.detach().float()

    def _check(self, residual: torch.Tensor, covariance: ResidualCovariance) -> None:
        if not self.fitted:
            msg = (
                "FOD's residual statistics are missing: reconstruction_term='mahalanobis' scores residuals "
                "against those of the training images, fitted after training. Train the model, or fit them on "
                "a trained checkpoint with Fod.fit_residual_statistics(datamodule)."
            )
            raise RuntimeError(msg)
        if residual.shape[1:] != self.mean.shape:
            msg = (
                f"residual statistics were fitted on {tuple(self.mean.shape)} (tokens, channels), this input gives "
                f"{tuple(residual.shape[1:])}: use the image size the model was trained with."
            )
            raise RuntimeError(msg)
        has_shared, has_position = self.precision.numel() > 0, self.position_precision.numel() > 0
        needs_shared, needs_position = covariance != "position", covariance != "shared"
        if (needs_shared and not has_shared) or (needs_position and not has_position):
            held = " and ".join(
                kind
                for kind, has in (("one shared covariance", has_shared), ("one covariance per position", has_position))
                if has
            )
            msg = (
                f"the residual statistics hold {held} but the {covariance!r} distance (asked for by the model's "
                f"residual_covariance or image_score) needs {'both' if covariance == 'blend' else 'the other'}: refit "
                "them with Fod.fit_residual_statistics(datamodule)."
            )
            raise RuntimeError(msg)

    def forward(self, residual: torch.Tensor, covariance: ResidualCovariance | None = None) -> torch.Tensor:
        """Mahalanobis distance of every token, ``(B, L, C)`` -> ``(B, L)``, under ``covariance``
        (default: this module's ``covariance``)."""
        covariance = covariance or self.covariance
        self._check(residual, covariance)
        centred = residual.float() - self.mean
        distances = []
        if covariance != "position":
            distances.append(((centred @ self.precision) * centred).sum(-1).clamp_min(0.0).sqrt())
        if covariance != "shared":  # (L, B, C) @ (L, C, C): one batched matmul, which every exporter handles
            whitened = (centred.transpose(0, 1) @ self.position_precision).transpose(0, 1)
            distances.append((whitened * centred).sum(-1).clamp_min(0.0).sqrt())
        return distances[0] if len(distances) == 1 else 0.5 * (distances[0] + distances[1])


class ResidualAccumulator:
    """Running float64 sums of residuals ``(B, L, C)`` for :func:`fit_statistics`, per level.

    ``per_position``: keep every position's outer products ``(L, C, C)`` (their sum over positions
    is the shared one) for per-position covariances.
    """

    def __init__(self, per_position: bool = False) -> None:
        self.per_position = per_position
        self.count = 0.0
        self.sum: torch.Tensor | None = None  # (L, C)
        self.outer: torch.Tensor | None = None  # (C, C), or (L, C, C) per position

    def add(self, residual: torch.Tensor) -> None:
        """Add a batch of residuals ``(B, L, C)``."""
        r = residual.detach().double()
        if self.sum is None:
            self.sum = torch.zeros(r.shape[1:], dtype=torch.float64, device=r.device)
            shape = (*r.shape[1:], r.shape[-1]) if self.per_position else (r.shape[-1], r.shape[-1])
            self.outer = torch.zeros(shape, dtype=torch.float64, device=r.device)
        self.sum += r.sum(dim=0)
        if self.per_position:
            by_position = r.transpose(0, 1)  # (L, B, C)
            self.outer += by_position.transpose(1, 2) @ by_position
        else:
            flat = r.flatten(0, 1)
            self.outer += flat.T @ flat
        self.count += r.shape[0]

    def finish(self, trainer: Trainer | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(L, C)`` means, the precision ``(C, C)`` of the pooled within-position covariance and, per
        position, ``(L, C, C)`` those of each position's covariance shrunk towards the pooled one (else None)."""
        if self.sum is None or self.outer is None:
            msg = "no training images: FOD needs them to fit its residual statistics."
            raise RuntimeError(msg)
        total, outer = self.sum, self.outer
        count = torch.tensor(self.count, dtype=torch.float64, device=total.device)
        if trainer is not None and trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
            outer = trainer.strategy.reduce(outer, reduce_op="sum")
            count = trainer.strategy.reduce(count, reduce_op="sum")
        mean = total / count
        positions, channels = mean.shape
        pooled = outer.sum(dim=0) if self.per_position else outer
        # sum over images and positions of (r - mu_l)(r - mu_l)^T = sum r r^T - N sum_l mu_l mu_l^T
        cov = (pooled - count * mean.T @ mean) / (count * positions - 1).clamp_min(1)
        cov = cov + SHRINKAGE * cov.diagonal().mean() * torch.eye(channels, dtype=cov.dtype, device=cov.device)
        position_precision = None
        if self.per_position:
            # sum over images of (r - mu_l)(r - mu_l)^T = sum r r^T - N mu_l mu_l^T, at every position l
            own = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1).clamp_min(1)
            weight = channels / (count + channels)
            position_precision = torch.linalg.inv((1 - weight) * own + weight * cov).float()
        return mean.float(), torch.linalg.inv(cov).float(), position_precision


@torch.no_grad()
def fit_statistics(
    model: FodModel,
    features: Iterable[list[torch.Tensor]],
    trainer: Trainer | None = None,
    weight: float = 1.0,
) -> None:
    """Fit every level's :class:`ResidualStatistics` on pooled training features (all batches, all ranks).

    ``weight=0``: this rank's shard is empty under DDP; it contributes shapes but no data.
    """
    was_training = model.training
    model.eval()
    accumulators: list[ResidualAccumulator] | None = None
    per_position = [statistics.per_position for statistics in model.anomaly_map_generator.statistics]
    try:
        for levels in features:
            run = model.run_levels(levels)
            if accumulators is None:
                accumulators = [ResidualAccumulator(flag) for flag in per_position]
            for accumulator, tokens, output in zip(accumulators, run.tokens, run.levels, strict=True):
                residual = tokens - output.reconstruction
                accumulator.add(residual if weight else residual[:0])
    finally:
        model.train(was_training)
    if accumulators is None:
        msg = "no training images: FOD needs them to fit its residual statistics."
        raise RuntimeError(msg)
    for statistics, accumulator in zip(model.anomaly_map_generator.statistics, accumulators, strict=True):
        statistics.set(*accumulator.finish(trainer))


class ResidualStatisticsCallback(Callback):
    """Fit the residual statistics on the training set when the scoring needs them and the weights changed.

    Before every validation of a fit (the post-processor learns its thresholds from validation scores)
    and at the end of training, if an optimizer step has happened since the last fit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fitted_at_step: int | None = None

    def refresh(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fit now if the scoring needs the statistics and an optimizer step has happened since the last fit."""
        model: FodModel = pl_module.model
        if not model.anomaly_map_generator.needs_statistics or self.fitted_at_step == trainer.global_step:
            return
        transform = pl_module.pre_processor.transform if pl_module.pre_processor is not None else None
        loader, weight = rank_batches(trainer)
        batches = iterate_pooled_features(
            model,
            loader,
            transform,
            pl_module.device,
            progress=trainer.is_global_zero,
            desc="FOD residual statistics",
            gains=model.settings.intensity_gains,
        )
        fit_statistics(model, batches, trainer, weight)
        self.fitted_at_step = trainer.global_step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse, before any step, per-position statistics too large to keep (the grids are known by now)."""
        del trainer
        model: FodModel = pl_module.model
        statistics = model.anomaly_map_generator.statistics
        if not model.anomaly_map_generator.needs_statistics or not any(s.per_position for s in statistics):
            return
        grids = [tuple(int(v) for v in level.ref_grid) for level in model.levels]
        if not all(h * w for h, w in grids):  # no references (with_inter=False): the grid is known only later
            return
        size = per_position_bytes(grids, model.feature_extractor.channels)
        if size > PER_POSITION_BUDGET_BYTES:
            msg = (
                f"residual_covariance={model.settings.residual_covariance!r} with image_score="
                f"{model.settings.image_score!r} needs {size / 2**30:.1f} GiB for one "
                f"covariance per token position (grids {grids}, backbone channels "
                f"{list(model.feature_extractor.channels)}); use residual_covariance='shared' and image_score='map' "
                "(one covariance per level), a smaller image size or a backbone with fewer channels."
            )
            raise ValueError(msg)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refit before validation scores the images (only during fit: test and predict use what is stored)."""
        if trainer.state.fn == "fit":
            self.refresh(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refit after the last step (a run without validation still leaves a usable model)."""
        self.refresh(trainer, pl_module)
