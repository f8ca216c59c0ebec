"""Cache of the frozen backbone's pooled features across training epochs.

The backbone is frozen and in eval mode, so without data augmentation an image gives the same
features in every epoch: computing them once saves the backbone's forward pass (for
WideResNet50 at 256x256 about a third of a training step's FLOPs) from the second epoch on.
Memory per image: ``sum_i C_i * h_i * w_i * 4`` bytes, e.g. 0.28 MB for EfficientNet-Lite0 and
3.1 MB for WideResNet50 at 256x256 (209 MVTec bottle images: 58 MB / 660 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class FeatureCache:
    """Pooled features per image, keyed by the image's file path.

    A batch is served from the cache only when every image in it is cached; otherwise the
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

    def get_or_compute(
        self,
        paths: Sequence[str],
        images: torch.Tensor,
        extract: Callable[[torch.Tensor], list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Features of a batch, per level ``(B, C_i, h_i, w_i)``."""
        if paths and all(p in self._store for p in paths):
            per_image = [self._store[p] for p in paths]
            return [torch.stack([feats[level] for feats in per_image]).to(images.device) for level in range(len(per_image[0]))]
        features = extract(images)
        for index, path in enumerate(paths):
            self._store[path] = [f[index].detach().clone() for f in features]
        return features
