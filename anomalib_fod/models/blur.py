"""Gaussian blur of an anomaly map: a torch module whose kernel is a buffer.

anomalib's ``GaussianBlur2d`` lives in ``anomalib.models.components``, a package that imports every anomalib
model and Lightning; the scoring modules of ``Fod`` and ``Cdo`` import only torch. The kernel is kornia's (as
anomalib's is), stored under the same buffer name and shape ``(1, 1, k, k)`` and applied with the same reflect
padding, so checkpoints saved with anomalib's module load into this one unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from kornia.filters import get_gaussian_kernel2d
from kornia.filters.kernels import normalize_kernel2d
from torch import nn


def kernel_size(sigma: float) -> int:
    """Odd kernel width that truncates the Gaussian at 4 sigma (scipy's ``gaussian_filter`` default)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


class GaussianBlur(nn.Module):
    """Blur ``(B, 1, H, W)`` maps with a normalised Gaussian of ``sigma`` px; the output has the input's size.

    Buffers: ``kernel`` ``(1, 1, k, k)`` with ``k = kernel_size(sigma)``.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        if sigma <= 0:
            msg = f"sigma must be positive, got {sigma}."
            raise ValueError(msg)
        size = kernel_size(sigma)
        kernel = normalize_kernel2d(get_gaussian_kernel2d(kernel_size=(size, size), sigma=(sigma, sigma)))
        self.register_buffer("kernel", kernel.view(1, 1, size, size))
        self.padding = (size // 2,) * 4

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> ``(B, 1, H, W)``; reflect padding at the borders."""
        return F.conv2d(F.pad(maps, self.padding, mode="reflect"), self.kernel)


def gaussian_blur(sigma: float) -> GaussianBlur | None:
    """A :class:`GaussianBlur` of ``sigma``, or ``None`` for ``sigma == 0`` (no blur)."""
    return GaussianBlur(sigma) if sigma > 0 else None
