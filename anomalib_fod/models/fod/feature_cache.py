"""Cache of the frozen backbone's pooled features of the training images, on the CPU.

The backbone is frozen and in eval mode, so when every transform an image goes through is
deterministic, an image gives the same features in every epoch: computing them once saves the
backbone's forward pass (for WideResNet50 at 256x256 about a third of a training step's FLOPs).

The cache is filled in one ordered pass over the training set when training starts
(``fitting.fill_feature_cache``; the same pass in a fresh and in a resumed run, so a resumed run trains
on the same bits), and is served only when the data cannot change between epochs (:func:`cache_blocker`):
:func:`is_deterministic` must hold for the dataset's augmentations (anomalib puts the datamodule's
training augmentations there) and for the model's pre-processing transform. It lives in CPU memory (moved to the model's device per batch):
``sum_i C_i * h_i * w_i * 4`` bytes per image, e.g. 0.28 MB for EfficientNet-Lite0 and 3.1 MB for
WideResNet50 at 256x256 (209 MVTec bottle images: 58 MB / 660 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from anomalib.data import AnomalibDataset
from anomalib.data.transforms import ExportableCenterCrop, SquarePad
from torch.utils.data import DataLoader
from torchvision.transforms import v2

# Transforms whose output depends only on their input (exact types: a subclass may add randomness).
DETERMINISTIC_TRANSFORMS: frozenset[type] = frozenset(
    {
        v2.Compose,
        v2.Resize,
        v2.CenterCrop,
        v2.Normalize,
        v2.Grayscale,
        v2.RGB,
        v2.ToDtype,
        v2.ToImage,
        v2.ToPureTensor,
        v2.Identity,
        v2.Pad,
        SquarePad,
        ExportableCenterCrop,
    }
)

Extractor = Callable[[torch.Tensor], list[torch.Tensor]]


def is_deterministic(transform: object) -> bool:
    """Whether ``transform`` (``None``, or a tree of torchvision v2 transforms) is known to be deterministic.

    Unknown transforms count as random: serving cached features for them could be stale.
    """
    if transform is None:
        return True
    if type(transform) not in DETERMINISTIC_TRANSFORMS:
        return False
    return all(is_deterministic(child) for child in getattr(transform, "transforms", ()))


def cache_blocker(loader: object, transform: object) -> str | None:
    """Why cached features of ``loader``'s images, pre-processed by ``transform``, could differ from fresh ones
    (``None``: they cannot)."""
    if not isinstance(loader, DataLoader) or not isinstance(loader.dataset, AnomalibDataset):
        return "the training data is not a single anomalib dataset, so its transforms are unknown"
    if not is_deterministic(loader.dataset.augmentations):
        return "the training set has random (or unknown) augmentations"
    if not is_deterministic(transform):
        return "the pre-processor's transform is not known to be deterministic"
    return None


class FeatureCache:
    """Pooled features per training image, keyed by the image's file path, kept on the CPU.

    A batch is served from the cache only when every image in it is cached; otherwise its
    features are computed with ``extract`` and stored.
    """

    def __init__(self) -> None:
        self._store: dict[str, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached tensors."""
        return sum(t.numel() * t.element_size() for feats in self._store.values() for t in feats)

    def clear(self) -> None:
        """Drop every cached feature (e.g. when the training data changes)."""
        self._store.clear()

    def store(self, paths: Sequence[str], features: Sequence[torch.Tensor]) -> None:
        """Keep per-level features ``(B, C_i, h_i, w_i)`` of the images at ``paths`` (copied to the CPU)."""
        for index, path in enumerate(paths):
            self._store[str(path)] = [f[index].detach().to("cpu", copy=True) for f in features]

    def fill(self, batches: Iterable[tuple[Sequence[str], torch.Tensor]], extract: Extractor) -> None:
        """Compute and keep the features of every ``(paths, pre-processed images)`` batch."""
        for paths, images in batches:
            self.store(paths, extract(images))

    def get_or_compute(self, paths: Sequence[str], images: torch.Tensor, extract: Extractor) -> list[torch.Tensor]:
        """Features of a batch, per level ``(B, C_i, h_i, w_i)`` on the device of ``images``."""
        keys = [str(path) for path in paths]
        if keys and all(key in self._store for key in keys):
            per_image = [self._store[key] for key in keys]
            levels = range(len(per_image[0]))
            return [torch.stack([feats[level] for feats in per_image]).to(images.device) for level in levels]
        features = extract(images)
        self.store(keys, features)
        return features
