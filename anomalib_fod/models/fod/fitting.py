"""Every pass of FOD over its training images besides the optimizer steps, in one place.

- **Reference features** (the inter-correlation branch's keys), once before the first step:
  ``mean`` (paper default) is the per-position mean of the 3x3-pooled features; ``coreset`` is a
  greedy k-center coreset of all pooled training tokens (as many as there are token positions),
  each keeping the grid position it came from, so the inter target stays a Gaussian over positions
  (single device only).
- **Residual statistics** (``residual_statistics.py``), after steps: the model's residuals on every
  training image, at every intensity gain, summed into each level's Gaussian.
- **Context score** (``context.py``), with the residual statistics when ``context_score`` is on: the same
  pass keeps every training token and residual (CPU memory: about twice the pooled features of the training
  images at every gain), then whitens the tokens, trains the context predictors and fits their residual
  statistics and z-units on them (one process only).
- **Nearest-token score** (``nearest.py``), with the residual statistics when ``nearest_tokens`` is on: the same
  pass keeps every training token and residual (of a random share of the images where all of them would not fit
  in memory, ``TrainingImages.keep_share``; the Gaussians still sum every image), then draws the banks and
  measures their z-units on held-out training images (one process only).
- **Feature cache** (``feature_cache.py``), when training starts: the frozen backbone's pooled
  features of every training image, in one ordered pass.

Every pass runs the model in eval mode and pre-processes the images exactly as training does.
Under DDP each rank sums its own shard ``rank, rank + world_size, ...`` of the training set and the
sums are all-reduced, so the results equal the single-device ones; the trainer's
``DistributedSampler`` is not used for these passes, because it pads the dataset to a multiple of
the world size by repeating images, which would count those images twice.

The Lightning callbacks that decide *when* a pass runs are in ``callbacks.py``; this module only
reads what it is handed (a model, batches, a transform) and a trainer's loader, rank and all-reduce.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING

import torch
from anomalib.models.components import KCenterGreedy
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .aligned_level import position_share_of
from .context import fit_whitening, train_predictors
from .nearest import decline_unmeasured, fit_nearest
from .residual_statistics import Reduce, ResidualAccumulator, chunks, run_generator
from .settings import ReferenceMode

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from .residual_statistics import ResidualStatistics
    from .settings import ResidualCovariance

    from .feature_cache import FeatureCache
    from .torch_model import FodModel

logger = logging.getLogger(__name__)

EMPTY_TRAINING_SET = "the training set is empty: FOD needs normal training images to compute its reference features."

# Batches of training images the fine map level's units are measured on, evenly spread over the training set: the
# standard deviation of tens of thousands of pixels per image is settled by a few dozen images, and a pass over all
# of them (a full inference) would add most of a statistics fit to every fit.
UNIT_BATCHES = 32

# How far outside [0, 1] images may lie before intensity gains refuse them as already normalised: resizing
# (bilinear, bicubic) overshoots by rounding or ringing, an ImageNet-normalised image spans about [-2.1, 2.6].
INTENSITY_SLACK = 0.25


def iterate_pooled_features(
    model: FodModel,
    batches: Iterable,
    transform: torch.nn.Module | None,
    device: torch.device,
    progress: bool = True,
    desc: str = "FOD reference features",
    gains: Sequence[float] = (1.0,),
    stages: MapLevelSums | None = None,
    weight: float = 1.0,
) -> Iterator[list[torch.Tensor]]:
    """Yield pooled backbone features of every batch, pre-processed as in training.

    ``gains``: each batch is seen once per gain, its images ``(B, 3, H, W)`` (intensities in ``[0, 1]``, as
    anomalib's datasets load them) multiplied by it and clipped to ``[0, 1]`` before the pre-processing; the
    copies go through the backbone together, so each yielded level is ``(len(gains) * B, C_i, h_i, w_i)``.
    ``stages``: also sum what the map-only levels read (the backbone's finer stage, the finest level unpooled), from
    the same pass, into its accumulators (their shapes alone where ``weight`` is 0: an empty DDP shard).
    """
    for images in iterate_images(batches, transform, device, progress, desc, gains):
        if stages is None:
            yield model.extract_features(images)
            continue
        features = model.extract_map_features(images)
        for accumulator, stage in ((stages.finer, features.finer), (stages.finest, features.finest)):
            if accumulator is not None:
                tokens = stage.flatten(2).transpose(1, 2)
                accumulator.add(tokens if weight else tokens[:0])
        yield features.levels


def iterate_images(
    batches: Iterable,
    transform: torch.nn.Module | None,
    device: torch.device,
    progress: bool = True,
    desc: str = "FOD training images",
    gains: Sequence[float] = (1.0,),
) -> Iterator[torch.Tensor]:
    """Yield every batch's images ``(len(gains) * B, 3, H, W)``, each gain's copy in turn, pre-processed as in
    training (see :func:`iterate_pooled_features`)."""
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        images = batch.image if hasattr(batch, "image") else batch
        images = images.to(device)
        # A resize may overshoot [0, 1] a little (the clip below handles it); a normalised batch is far outside.
        if any(gain != 1 for gain in gains) and (images.min() < -INTENSITY_SLACK or images.max() > 1 + INTENSITY_SLACK):
            msg = (
                f"intensity_gains {tuple(gains)} scale images with intensities in [0, 1], as anomalib's datasets "
                f"load them; this batch spans [{float(images.min()):.3g}, {float(images.max()):.3g}] (already "
                "normalised?). Give the model unnormalised images or set intensity_gains=(1.0,)."
            )
            raise ValueError(msg)
        # One forward pass over every gain's copy: batched convolutions and attentions cost less than one per gain.
        scaled = torch.cat([images if gain == 1 else (images * gain).clamp(0, 1) for gain in gains])
        yield transform(scaled) if transform is not None else scaled


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """Rank ``rank``'s share of ``loader``'s dataset, in order and without padding.

    Samples ``rank, rank + world_size, ...``: over all ranks every sample is seen exactly once
    (a ``DistributedSampler`` would repeat samples to even out the shards). Uses the loader's
    batch size, collate function and workers. A rank left without samples (fewer samples than
    ranks) gets sample 0, which :func:`mean_reference` is told to weigh with zero.
    """
    indices = list(range(rank, len(loader.dataset), world_size)) or [0]
    return DataLoader(
        Subset(loader.dataset, indices),
        batch_size=loader.batch_size or 1,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def distributed_sum(trainer: Trainer | None) -> Reduce | None:
    """The all-reduce (sum) over the trainer's processes, or ``None`` on one process."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def in_file_order(loader: DataLoader) -> DataLoader:
    """``loader``'s dataset once, in file order, with its batch size, collate function and workers.

    The statistics are fitted on the training images in this order, not the shuffled training order: the
    nearest-token draws and folds follow the order the images arrive in, so a shuffled pass would fit a checkpoint's
    statistics differently every time (and unlike a seeded run's, a later refit's shuffle has no seed of its own).
    """
    return shard_loader(loader, 0, 1)


def rank_batches(trainer: Trainer) -> tuple[Iterable, float]:
    """The training batches this rank sums over, in file order, and their weight (0 for an empty DDP shard).

    Under DDP each rank takes its own unpadded shard (:func:`shard_loader`), so a sum over ranks sees
    every training image once.
    """
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        if trainer.world_size > 1:
            logger.warning(
                "FOD: the training data is not a single DataLoader; under DDP its padded distributed "
                "sampler may count a few images twice in sums over the training set.",
            )
        return loader, 1.0
    if trainer.world_size <= 1:
        return in_file_order(loader), 1.0
    rank, world_size = trainer.global_rank, trainer.world_size
    weight = 1.0 if rank < len(loader.dataset) else 0.0
    return shard_loader(loader, rank, world_size), weight


def mean_reference(
    features: Iterable[list[torch.Tensor]],
    reduce: Reduce | None = None,
    weight: float = 1.0,
) -> list[torch.Tensor]:
    """Per-position mean ``(C_i, h_i, w_i)`` of each level over all batches (and all processes, with ``reduce``).

    ``weight=0`` makes this rank contribute shapes but no data to the all-reduce (an empty shard).
    """
    sums: list[torch.Tensor] | None = None
    count = None
    for levels in features:
        if weight == 0:
            levels = [f[:0] for f in levels]  # noqa: PLW2901 - keep the shapes, drop the samples
        if sums is None:
            sums = [torch.zeros(f.shape[1:], dtype=torch.float64, device=f.device) for f in levels]
            count = torch.zeros((), dtype=torch.float64, device=levels[0].device)
        for total, f in zip(sums, levels, strict=True):
            total += f.double().sum(dim=0)
        count += levels[0].shape[0]
    if sums is None:
        raise RuntimeError(EMPTY_TRAINING_SET)
    if reduce is not None:
        sums = [reduce(s) for s in sums]
        count = reduce(count)
    if count <= 0:
        raise RuntimeError(EMPTY_TRAINING_SET)
    return [(s / count).float() for s in sums]


def coreset_reference(
    features: Iterable[list[torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    """Greedy k-center coreset of all training tokens per level ``(S_i, C_i)``, their ``(S_i, 2)`` grid positions
    and each level's grid."""
    collected = [[f.cpu() for f in levels] for levels in features]
    if not collected:
        raise RuntimeError(EMPTY_TRAINING_SET)
    tokens, positions, grids = [], [], []
    for level in range(len(collected[0])):
        maps = torch.cat([c[level] for c in collected])  # (N, C, h, w)
        _, channels, height, width = maps.shape
        flat = maps.permute(0, 2, 3, 1).reshape(-1, channels)  # (N * h * w, C)
        ratio = min(1.0, (height * width) / flat.shape[0])
        indices = torch.as_tensor(KCenterGreedy(flat, sampling_ratio=ratio).select_coreset_idxs(), dtype=torch.long)
        cell = indices % (height * width)
        tokens.append(flat[indices])
        positions.append(torch.stack((cell // width, cell % width), dim=-1).float())
        grids.append((height, width))
    return tokens, positions, grids


@dataclass(frozen=True)
class TrainingImages:
    """The training images as one pass sees them.

    Attributes:
        batches: this process's batches of training images (intensities in ``[0, 1]``).
        transform: the training pre-processing (the pre-processor's transform), or ``None``.
        device: where the model runs.
        progress: show a progress bar.
        reduce: sums over the processes of a distributed fit (:func:`distributed_sum`), ``None`` on one process.
        weight: 0 when this process's share is empty under DDP: it contributes shapes but no data.
        seed: the run's seed for the fit's random draws (the nearest-token score's folds and banks, the context
            predictors' batches), ``None``: the process's (``torch.initial_seed()``).
        keep_share: share of the training images whose tokens and residuals the nearest-token fit keeps, drawn at
            random from ``seed`` (1: all). Set where keeping all of them would not fit in memory: the bank, the
            position share and the held-out z-units are then estimated from that random subset of the images.
    """

    batches: Iterable
    transform: torch.nn.Module | None
    device: torch.device
    progress: bool = True
    reduce: Reduce | None = None
    weight: float = 1.0
    seed: int | None = None
    keep_share: float = 1.0

    def features(
        self, model: FodModel, desc: str, gains: Sequence[float] = (1.0,), stages: MapLevelSums | None = None
    ) -> Iterator[list[torch.Tensor]]:
        """Pooled backbone features of every batch (see :func:`iterate_pooled_features`)."""
        return iterate_pooled_features(
            model, self.batches, self.transform, self.device, self.progress, desc, gains, stages, self.weight
        )

    def images(self, desc: str, gains: Sequence[float] = (1.0,)) -> Iterator[torch.Tensor]:
        """Every batch's pre-processed images at every gain (see :func:`iterate_images`)."""
        return iterate_images(self.batches, self.transform, self.device, self.progress, desc, gains)


def fit_reference(model: FodModel, images: TrainingImages, mode: ReferenceMode = "mean") -> None:
    """Store the reference features of ``mode`` computed from the training images (model in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        features = images.features(model, "FOD reference features")
        if mode == "mean":
            model.set_mean_reference(mean_reference(features, images.reduce, images.weight))
        else:
            model.set_reference_tokens(*coreset_reference(features))
    finally:
        model.train(was_training)


@dataclass
class KeptLevels:
    """The training tokens and reconstruction residuals of one pass, per level ``(N, L_i, C_i)`` on the CPU: of every
    image, or of a random ``share`` of them (each kept image with its copies at every one of ``gains`` gains, as the
    batches hold them: ``gains`` copies of their ``B`` images, gain by gain)."""

    tokens: list[list[torch.Tensor]]
    residuals: list[list[torch.Tensor]]
    grids: list[tuple[int, int]]
    share: float = 1.0
    gains: int = 1
    generator: torch.Generator | None = None

    def add(self, tokens: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor], grids: list[tuple[int, int]]) -> None:
        """Keep one batch's per-level ``(R, L_i, C_i)`` tokens and residuals (``R = gains * B``), or the rows of
        its images drawn with probability ``share``."""
        if not self.tokens:
            self.tokens, self.residuals, self.grids = [[] for _ in tokens], [[] for _ in tokens], grids
        rows = None
        if self.share < 1:
            images = tokens[0].shape[0] // self.gains
            drawn = torch.rand(images, generator=self.generator) < self.share
            if not drawn.any():
                return
            chosen = drawn.nonzero().flatten()
            rows = (torch.arange(self.gains)[:, None] * images + chosen[None]).flatten()
        for kept, tensor in zip(self.tokens + self.residuals, list(tokens) + list(residuals), strict=True):
            tensor = tensor.detach()
            kept.append((tensor if rows is None else tensor[rows.to(tensor.device)]).float().cpu())

    @property
    def images(self) -> int:
        """How many images it holds (each at every gain)."""
        return sum(batch.shape[0] for batch in self.tokens[0]) // self.gains if self.tokens else 0


@torch.no_grad()
def fit_statistics(
    model: FodModel,
    features: Iterable[list[torch.Tensor]],
    reduce: Reduce | None = None,
    weight: float = 1.0,
    keep: KeptLevels | None = None,
) -> None:
    """Fit every level's :class:`~.residual_statistics.ResidualStatistics` on pooled training features (all
    batches; all processes with ``reduce``).

    ``weight=0``: this rank's shard is empty under DDP; it contributes shapes but no data. ``keep``: also keep
    every token and residual there (for the context score).
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
            residuals = [tokens - output.reconstruction for tokens, output in zip(run.tokens, run.levels, strict=True)]
            for accumulator, residual in zip(accumulators, residuals, strict=True):
                accumulator.add(residual if weight else residual[:0])
            if keep is not None:
                keep.add(run.tokens, residuals, run.grids)
    finally:
        model.train(was_training)
    if accumulators is None:
        msg = "no training images: FOD needs them to fit its residual statistics."
        raise RuntimeError(msg)
    for statistics, accumulator in zip(model.anomaly_map_generator.statistics, accumulators, strict=True):
        statistics.set(*accumulator.finish(reduce))


def fit_residual_statistics(model: FodModel, images: TrainingImages, train_context: bool = True) -> None:
    """Fit the residual statistics on the training images, each seen at every one of the model's
    ``intensity_gains``; with ``context_score``, then the context score on the same tokens (``train_context=False``:
    only its z-units, which follow the Transformers; the predictor reads the input features alone); with
    ``nearest_tokens``, then the banks and their z-units; with the map-only levels (``aligned_map_weight``,
    ``fine_map_weight``), then theirs (:func:`fit_map_levels`), whose units follow the whole map."""
    generator = model.anomaly_map_generator
    if generator.aligned is not None:
        generator.aligned.forget_choice()  # measured again on these images
    # the map-only levels' Gaussians are summed in the same pass over the training images; their units need another
    stages = MapLevelSums(
        None if generator.fine is None else ResidualAccumulator(per_position=True),
        None if generator.aligned is None else ResidualAccumulator(per_position=True),
    )
    fit_token_scores(model, images, train_context, stages if stages.any else None)
    if stages.any:
        fit_map_levels(model, images, stages)


def fit_token_scores(
    model: FodModel, images: TrainingImages, train_context: bool = True, stages: MapLevelSums | None = None
) -> None:
    """The levels' part of :func:`fit_residual_statistics`: the Gaussians and the context or nearest-token score
    (``stages``: the map-only levels' sums, fed by the same pass)."""
    gains = model.settings.intensity_gains
    features = images.features(model, "FOD residual statistics", gains, stages)
    generator = model.anomaly_map_generator
    option = generator.keeps_training_tokens
    if option is None:
        fit_statistics(model, features, images.reduce, images.weight)
        return
    if images.reduce is not None:
        if option == "nearest_tokens" and model.settings.nearest_chooses:
            decline_unmeasured(generator.nearest, "it is fitted on one process, not under DDP (devices=1)")
            fit_statistics(model, features, images.reduce, images.weight)
            return
        msg = f"{option} is fitted on one process: fit it without DDP (devices=1)."
        raise NotImplementedError(msg)
    share = images.keep_share if option == "nearest_tokens" else 1.0
    draws = run_generator(images.seed)
    kept = KeptLevels([], [], [], share=share, gains=len(gains), generator=draws)
    fit_statistics(model, features, keep=kept)
    if share < 1:
        logger.debug("FOD nearest-token score: the tokens of %d training images drawn at random kept", kept.images)
    if option == "nearest_tokens":
        fit_nearest(
            generator.nearest, generator.statistics, kept.tokens, kept.residuals, gains,
            model.settings.nearest_tokens, images.device, model.settings.nearest_position_limit, images.seed,
            draws,
        )
        return
    fit_context(model, kept, images.device, images.progress, train=train_context, seed=images.seed)


@dataclass
class MapLevelSums:
    """The map-only levels' running sums, fed by the residual statistics' pass: the backbone's finer stage (fine
    level) and the finest level unpooled (aligned level); ``None`` for a level the model does not have."""

    finer: ResidualAccumulator | None
    finest: ResidualAccumulator | None

    @property
    def any(self) -> bool:
        return self.finer is not None or self.finest is not None


@torch.no_grad()
def fit_map_levels(model: FodModel, images: TrainingImages, stages: MapLevelSums) -> None:
    """Fit the map-only levels from their sums over every training image at every intensity gain (summed by the
    residual statistics' pass): the aligned level's position share, which decides whether it takes part
    (``aligned_level.py``), and its Gaussian; the fine level's Gaussian (``fine_level.py``); then their units, the
    standard deviations of the model's map (unblurred, levels weighted as in the anomaly map), of the aligned
    level's map, of the two together and of the fine level's map, over every pixel of up to ``UNIT_BATCHES``
    batches of the training images as they are, evenly spread over them (and of every process, with
    ``images.reduce``). The fine level's units are those of the map it is added to: the model's and the aligned
    level's together."""
    generator = model.anomaly_map_generator
    aligned, fine = generator.aligned, generator.fine
    if aligned is not None and stages.finest is not None:
        finest_sums = stages.finest.sums(images.reduce)
        total, outer, count = finest_sums
        # one image (at any number of gains) tells nothing about where looks vary: unmeasured, the default leaves it out
        images_seen = float(count) / len(model.settings.intensity_gains)
        share = position_share_of(total, outer, float(count)) if images_seen >= 2 else float("nan")  # noqa: PLR2004
        if aligned.choose(share):
            aligned.statistics.set(*stages.finest.finish(sums=finest_sums))
        logger.debug(aligned.describe())  # the fit callback says it on the console, once per fit
    if fine is not None and stages.finer is not None:
        fine.statistics.set(*stages.finer.finish(images.reduce))
    with_aligned = generator.aligned_active
    if not with_aligned and fine is None:
        return
    was_training = model.training
    model.eval()
    try:
        # per pixel: count, sums of M, A, F, M^2, A^2, F^2 and M A (M the model's map, A the aligned, F the fine)
        sums = torch.zeros(8, dtype=torch.float64, device=images.device)
        batches = images.batches
        step = max(1, math.ceil(len(batches) / UNIT_BATCHES)) if hasattr(batches, "__len__") else 1
        for batch in replace(images, batches=islice(batches, 0, None, step)).images("FOD map level units"):
            features = model.extract_map_features(batch)
            size = (int(batch.shape[-2]), int(batch.shape[-1]))
            run = model.run_levels(features.levels)
            scores = generator.level_scores(run.tokens, run.levels, run.grids)
            weights = generator.map_level_weights
            maps = [generator.combine_levels(scores.map, run.grids, size, weights, blur=False)[0]]
            for level, stage in ((aligned, features.finest), (fine, features.finer)):
                present = level is not None and stage is not None
                maps.append(level.distance_map(stage, size, generator.align_corners) if present else maps[0] * 0)
            flat = [m.double().flatten()[: None if images.weight else 0] for m in maps]  # an empty DDP shard adds 0
            sums += torch.stack([
                flat[0].new_tensor(flat[0].numel()), *(f.sum() for f in flat), *(f.square().sum() for f in flat),
                (flat[0] * flat[1]).sum(),
            ])
        if images.reduce is not None:
            sums = images.reduce(sums)
        pixels, means, squares, cross = sums[0], sums[1:4] / sums[0], sums[4:7] / sums[0], sums[7] / sums[0]
        correction = pixels / (pixels - 1)
        variances = ((squares - means.square()) * correction).clamp_min(0)
        covariance = (cross - means[0] * means[1]) * correction
        model_std = variances[0].sqrt()
        if with_aligned:
            aligned.set_units(model_std.float(), variances[1].sqrt().float())
            factor = aligned.scale().double()
            # the fine level joins the map with the aligned level's part in it: var(M + c A)
            model_std = (variances[0] + factor.square() * variances[1] + 2 * factor * covariance).clamp_min(0).sqrt()
        if fine is not None:
            fine.set_units(model_std.float(), variances[2].sqrt().float())
    finally:
        model.train(was_training)


def _distances(
    statistics: ResidualStatistics, residuals: Iterable[torch.Tensor], kinds: tuple[ResidualCovariance | None, ...]
) -> list[torch.Tensor]:
    """The ``(N, L)`` distances of chunked ``(n, L, C)`` residuals under each of ``kinds``, on the CPU (one
    per-position product per chunk for all of them)."""
    parts = [statistics.distances(residual, kinds) for residual in residuals]
    return [torch.cat([part[kind].cpu() for part in parts]) for kind in range(len(kinds))]


@torch.no_grad()
def fit_context(
    model: FodModel,
    kept: KeptLevels,
    device: torch.device,
    progress: bool = True,
    train: bool = True,
    seed: int | None = None,
) -> None:
    """Fit every level's :class:`~.context.ContextLevel` on the kept training tokens and residuals: whitening,
    ``context_steps`` predictor steps (their batches drawn from ``seed``, the run's), the context residuals'
    statistics (only with ``train``; none of them depends on the Transformers), and both distances' z-units."""
    generator = model.anomaly_map_generator
    levels = generator.context
    train = train or not all(level.fitted for level in levels)
    was_training = model.training
    model.eval()
    whitened, rec, rec_position = [], [], []
    try:
        for index, (level, tokens, residuals) in enumerate(zip(levels, kept.tokens, kept.residuals, strict=True)):
            tokens, residuals = torch.cat(tokens), torch.cat(residuals)
            if train:
                level.set_whitening(*fit_whitening(tokens.flatten(0, 1)))
            whitened.append(level.whiten(tokens))
            statistics = generator.statistics[index]
            # the image score's units too, where the reconstruction statistics hold per-position covariances
            kinds = (None, "position") if statistics.position_precision.numel() else (None,)
            blend, *position = _distances(statistics, chunks(residuals, device), kinds)
            rec.append(blend)
            rec_position.extend(position)
        kept.tokens, kept.residuals = [], []  # the whitened copies replace them
        steps = model.settings.context_steps if train else 0

        def log(step: int, loss: float) -> None:
            logger.debug("FOD context predictor: step %d/%d, loss %.4f", step, steps, loss)

        with torch.enable_grad():
            losses = train_predictors(
                levels, whitened, kept.grids, steps, device, progress, log, model.settings.context_query_share, seed
            )
        explained = []
        for index, (level, tokens, grid, distances) in enumerate(zip(levels, whitened, kept.grids, rec, strict=True)):
            residuals = [t - level.predictor(t, grid) for t in chunks(tokens, device)]
            if train:
                accumulator = ResidualAccumulator(per_position=True)
                for residual in residuals:
                    accumulator.add(residual)
                level.statistics.set(*accumulator.finish())
            if rec_position:  # both distances from one per-position product
                context, position = _distances(level.statistics, residuals, (None, "position"))
                level.set_units(distances, context, rec_position[index], position)
            else:
                level.set_units(distances, *_distances(level.statistics, residuals, (None,)))
            explained.append(1 - float(sum(r.square().sum() for r in residuals) / tokens.square().sum()))
    finally:
        model.train(was_training)
    logger.info(
        "FOD context score: %d predictor steps on %d training images (every gain)%s; share of the whitened tokens' variance "
        "the predictors explain (in-sample), per level: %s",
        steps,
        whitened[0].shape[0],
        f", last loss {losses[-1]:.4f}" if losses else "",
        ", ".join(f"{value:.3f}" for value in explained),
    )


def fill_feature_cache(cache: FeatureCache, model: FodModel, images: TrainingImages) -> None:
    """One ordered pass over the training images (this device's share, as the training steps see it) into
    ``cache``, keyed by each image's path.

    Iterating a DataLoader draws from the global RNG; the RNG states are restored afterwards, so the
    training order does not depend on whether the cache was filled.
    """

    def batches() -> Iterator[tuple[list[str], torch.Tensor]]:
        for batch in tqdm(images.batches, desc="FOD feature cache", disable=not images.progress, leave=False):
            pixels = batch.image.to(images.device)
            yield list(batch.image_path), images.transform(pixels) if images.transform else pixels

    cuda = [images.device.index or 0] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        cache.fill(batches(), model.extract_features)
