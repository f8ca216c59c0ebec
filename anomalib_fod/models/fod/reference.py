"""Reference features for FOD's inter-correlation branch, computed from the training set.

The callback runs once when training starts, before the first optimisation step: it passes
the whole training set through the frozen backbone with the model in eval mode and the
pre-processor applied exactly as in training, and stores the result in the model's buffers.

- ``mean`` (paper default): the per-position mean of the 3x3-pooled features. Under DDP every
  rank sums its own shard ``rank, rank + world_size, ...`` of the training set and the sums and
  counts are all-reduced, so the result equals the single-device mean. The trainer's
  ``DistributedSampler`` is not used for this pass: it pads the dataset to a multiple of the
  world size by repeating images, which would count those images twice.
- ``coreset``: a greedy k-center coreset of all pooled training tokens (as many as there are
  token positions), each keeping the grid position it came from, so the inter target stays a
  Gaussian over positions. Single device only.

When training resumes from a checkpoint (``ckpt_path``) that already holds references, they
are kept as they are, so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from anomalib.models.components import KCenterGreedy
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from anomalib_fod.utils import check_choice

from .settings import ReferenceMode

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .torch_model import FodModel

logger = logging.getLogger(__name__)


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
) -> Iterable[list[torch.Tensor]]:
    """Yield pooled backbone features of every batch, pre-processed as in training.

    ``gains``: each batch is seen once per gain, its images ``(B, 3, H, W)`` (intensities in ``[0, 1]``, as
    anomalib's datasets load them) multiplied by it and clipped to ``[0, 1]`` before the pre-processing; the
    copies go through the backbone together, so each yielded level is ``(len(gains) * B, C_i, h_i, w_i)``.
    """
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
        yield model.extract_features(transform(scaled) if transform is not None else scaled)


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


def mean_reference(
    features: Iterable[list[torch.Tensor]],
    trainer: Trainer | None = None,
    weight: float = 1.0,
) -> list[torch.Tensor]:
    """Per-position mean ``(C_i, h_i, w_i)`` of each level over all batches (and all ranks).

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
        msg = "the training set is empty: FOD needs normal training images to compute its reference features."
        raise RuntimeError(msg)
    if trainer is not None and trainer.world_size > 1:
        sums = [trainer.strategy.reduce(s, reduce_op="sum") for s in sums]
        count = trainer.strategy.reduce(count, reduce_op="sum")
    if count <= 0:
        msg = "the training set is empty: FOD needs normal training images to compute its reference features."
        raise RuntimeError(msg)
    return [(s / count).float() for s in sums]


def coreset_reference(
    features: Iterable[list[torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    """Greedy k-center coreset of all training tokens per level, with their grid positions."""
    collected: list[list[torch.Tensor]] = []
    for levels in features:
        collected.append([f.cpu() for f in levels])
    if not collected:
        msg = "the training set is empty: FOD needs normal training images to compute its reference features."
        raise RuntimeError(msg)
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


def rank_batches(trainer: Trainer) -> tuple[Iterable, float]:
    """The training batches this rank sums over, and their weight (0 for an empty DDP shard).

    Under DDP each rank takes its own unpadded shard (:func:`shard_loader`), so a sum over ranks sees
    every training image once.
    """
    loader = trainer.train_dataloader
    if trainer.world_size <= 1:
        return loader, 1.0
    if not isinstance(loader, DataLoader):
        logger.warning(
            "FOD: the training data is not a single DataLoader; under DDP its padded distributed "
            "sampler may count a few images twice in sums over the training set.",
        )
        return loader, 1.0
    rank, world_size = trainer.global_rank, trainer.world_size
    weight = 1.0 if rank < len(loader.dataset) else 0.0
    return shard_loader(loader, rank, world_size), weight


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
        transform = pl_module.pre_processor.transform if pl_module.pre_processor is not None else None
        batches, weight = rank_batches(trainer)
        was_training = model.training
        model.eval()
        try:
            features = iterate_pooled_features(
                model,
                batches,
                transform,
                pl_module.device,
                progress=trainer.is_global_zero,
            )
            if self.mode == "mean":
                model.set_mean_reference(mean_reference(features, trainer, weight))
            else:
                model.set_reference_tokens(*coreset_reference(features))
        finally:
            model.train(was_training)
