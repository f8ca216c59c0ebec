"""Synthetic anomalies for CDO's training, made batch-wise on pre-processed images.

CDO trains the student to *disagree* with the teacher on synthetic defects, so every training
batch is partly corrupted before the forward pass:

- ``"white_noise"`` (the paper): 0 to 4 axis-aligned rectangles per image, each side between
  1/20 and 1/5 of the image side (half-sides ``H/40 .. H/10`` as in the original code), filled
  with uniform noise. About one image in five gets no rectangle and stays fully normal.
- ``"perlin"``: anomalib's :class:`~anomalib.data.utils.generators.PerlinAnomalyGenerator`
  (the DRAEM-style Perlin-shaped blends of augmented noise).

The batch arrives normalised by the pre-processor (``(x - mean) / std``), but both kinds of noise
are defined on ``[0, 1]`` pixels. The generators therefore hold the normalisation and draw or
blend in pixel space, then write the result back in normalised space, only inside the mask:
pixels outside it are returned bit-for-bit unchanged. Everything runs on the batch's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from anomalib_fod.utils import check_choice

AnomalySource = Literal["white_noise", "perlin"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _NormalisedGenerator(nn.Module):
    """Holds the pre-processor's per-channel ``mean``/``std`` as ``(1, C, 1, 1)`` buffers."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        # Not persistent: they follow the pre-processor (set_normalisation), not the checkpoint.
        self.register_buffer("mean", torch.zeros(1, len(mean), 1, 1), persistent=False)
        self.register_buffer("std", torch.ones(1, len(std), 1, 1), persistent=False)
        self.set_normalisation(mean, std)

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use the normalisation ``(x - mean) / std`` of the pre-processor (``0``/``1``: none)."""
        mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.shape != std_t.shape or bool((std_t <= 0).any()):
            msg = f"normalisation needs one positive std per mean, got mean={list(mean)}, std={list(std)}."
            raise ValueError(msg)
        self.mean = mean_t.to(self.mean.device)
        self.std = std_t.to(self.std.device)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, C, H, W)`` -> ``[0, 1]`` pixel scale."""
        return images * self.std.to(images.dtype) + self.mean.to(images.dtype)

    def to_normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` pixel scale ``(B, C, H, W)`` -> the pre-processor's normalised scale."""
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)


class WhiteNoiseGenerator(_NormalisedGenerator):
    """Paste random uniform-noise rectangles into every image of a batch (CDO paper).

    Args:
        max_count: most rectangles per image; the count is uniform in ``0 .. max_count``.
        min_half_fraction: smallest half-side as a fraction of the image side (at least 1 px).
        max_half_fraction: largest half-side (exclusive) as a fraction of the image side.
        mean: per-channel mean of the pre-processor's normalisation.
        std: per-channel std of the pre-processor's normalisation.

    Shapes:
        ``(B, C, H, W)`` normalised images -> ``(B, C, H, W)`` images and ``(B, 1, H, W)`` masks
        (1 on exactly the replaced pixels, 0 elsewhere), both of the images' dtype and device.
    """

    def __init__(
        self,
        max_count: int = 4,
        min_half_fraction: float = 1 / 40,
        max_half_fraction: float = 1 / 10,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(mean, std)
        if max_count < 0 or not 0 < min_half_fraction <= max_half_fraction < 0.5:  # noqa: PLR2004
            msg = (
                "need max_count >= 0 and 0 < min_half_fraction <= max_half_fraction < 0.5, got "
                f"{max_count}, {min_half_fraction}, {max_half_fraction}."
            )
            raise ValueError(msg)
        self.max_count = max_count
        self.min_half_fraction = min_half_fraction
        self.max_half_fraction = max_half_fraction

    def _half_range(self, side: int) -> tuple[int, int]:
        """Inclusive half-side range in pixels; at least 1 px so tiny images still get defects."""
        low = max(1, int(side * self.min_half_fraction))
        high = max(low, int(side * self.max_half_fraction) - 1)
        return low, min(high, max(1, (side - 1) // 2))

    def _spans(
        self,
        shape: tuple[int, int],
        side: int,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start (inclusive) and end (exclusive) of ``shape`` random intervals along one side."""
        low, high = self._half_range(side)
        half = low + (torch.rand(shape, device=device, generator=generator) * (high - low + 1)).long()
        # Centre in [half, side - half): the rectangle lies fully inside the image.
        room = (side - 2 * half).clamp_min(1)
        centre = half + (torch.rand(shape, device=device, generator=generator) * room).long()
        return centre - half, centre + half

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt ``images`` ``(B, C, H, W)``; returns the new images and ``(B, 1, H, W)`` masks.

        ``generator`` (on the images' device) makes the draw reproducible; default: global RNG.
        """
        batch, channels, height, width = images.shape
        device = images.device
        count = self.max_count
        if count == 0:
            return images.clone(), images.new_zeros(batch, 1, height, width)
        # All rectangles of the batch at once: (B, K) boxes, the first n_b of image b are active.
        n_boxes = torch.randint(0, count + 1, (batch, 1), device=device, generator=generator)
        active = torch.arange(count, device=device).view(1, count) < n_boxes
        top, bottom = self._spans((batch, count), height, device, generator)
        left, right = self._spans((batch, count), width, device, generator)
        rows = torch.arange(height, device=device).view(1, 1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, 1, width)
        inside = (
            (rows >= top[..., None, None])
            & (rows < bottom[..., None, None])
            & (cols >= left[..., None, None])
            & (cols < right[..., None, None])
            & active[..., None, None]
        )
        mask = inside.any(dim=1, keepdim=True)  # (B, 1, H, W)
        noise = torch.rand((batch, channels, height, width), device=device, generator=generator)
        noise = self.to_normalised(noise.to(images.dtype))
        return torch.where(mask, noise, images), mask.to(images.dtype)


class PerlinGenerator(_NormalisedGenerator):
    """anomalib's Perlin anomaly generator applied to normalised batches.

    Args:
        probability: chance that an image gets an anomaly (the rest stay normal). 0.8 matches
            the white-noise source, where one image in five gets no rectangle.
        blend_factor: opacity of the anomaly, a value or a ``(min, max)`` range (anomalib's default).
        mean: per-channel mean of the pre-processor's normalisation.
        std: per-channel std of the pre-processor's normalisation.

    Shapes:
        ``(B, 3, H, W)`` normalised images -> ``(B, 3, H, W)`` images and ``(B, 1, H, W)`` masks.
    """

    def __init__(
        self,
        probability: float = 0.8,
        blend_factor: float | tuple[float, float] = (0.2, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(mean, std)
        from anomalib.data.utils.generators import PerlinAnomalyGenerator  # noqa: PLC0415 - only this source

        self.perlin = PerlinAnomalyGenerator(probability=probability, blend_factor=blend_factor)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt ``images`` ``(B, 3, H, W)``; returns the new images and ``(B, 1, H, W)`` masks."""
        # anomalib's augmenters (solarize, posterize, colour jitter) expect [0, 1] pixels.
        augmented, masks = self.perlin(self.to_pixels(images.float()))
        anomalous = masks > 0.5  # noqa: PLR2004
        # Outside the mask keep the input exactly (the round trip through pixels is not bit-exact).
        result = torch.where(anomalous, self.to_normalised(augmented).to(images.dtype), images)
        return result, anomalous.to(images.dtype)


def make_anomaly_generator(
    source: AnomalySource,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> WhiteNoiseGenerator | PerlinGenerator:
    """The synthetic-anomaly generator for ``anomaly_source`` (``"white_noise"`` or ``"perlin"``)."""
    check_choice("anomaly_source", source, AnomalySource)
    generator = WhiteNoiseGenerator if source == "white_noise" else PerlinGenerator
    return generator(mean=mean, std=std)
