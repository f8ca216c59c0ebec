"""torchvision's antialiased resize, written with ops every ONNX/OpenVINO runtime executes exactly.

The models are trained on images resized by ``torchvision.transforms.v2.Resize(antialias=True)``
(bilinear by default): when it shrinks an image, the interpolation filter is stretched by the scale
factor, so every input pixel contributes (Pillow's algorithm). An exported graph that accepts
images of any size has to do the same resize inside the graph. torch's exporter turns
``interpolate(antialias=True)`` into ONNX ``Resize(antialias=1)``; ONNX Runtime honours it, but
OpenVINO 2026.4's CPU plugin ignores the attribute and resizes without the stretched filter
(measured: up to 0.38 apart on [0, 1] images shrunk from 256x400 to 256x256). So the resize is
written out here instead: per axis, a gather of each output pixel's input taps and a weighted sum
with the filter weights torch computes (``UpSampleKernel.cpp``, ``_compute_indices_min_size_weights_aa``),
from shape arithmetic that stays symbolic in the exported graph. It matches torchvision within float
rounding (< 1e-6 on [0, 1] images) in eager mode, ONNX Runtime and OpenVINO alike.

As torch does, an axis whose length already equals the target is passed through untouched in eager
mode. In an exported graph the length is only known at run time, so the graph resamples it too:
its filter then puts weight exactly 1 on the pixel itself and exactly 0 on the filter's other taps
(2 for bilinear, 4 for bicubic), which reproduces the input bit for bit. The graph has no branch on
the input size: OpenVINO 2026.4 gave wrong FOD scores on the first inference through such an ``If``
(measured: up to 0.48 apart), and a branch-free graph keeps static shapes after the resize.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

ResizeFilter = Literal["bilinear", "bicubic"]
RESIZE_FILTERS: tuple[ResizeFilter, ...] = ("bilinear", "bicubic")
# Half-width of each filter in input pixels at scale 1 (torch: interp_size / 2).
_RADIUS = {"bilinear": 1, "bicubic": 2}
_BICUBIC_A = -0.5  # Keys' coefficient in Pillow's and torch's antialiased bicubic filter


def _filter_weights(x: torch.Tensor, mode: ResizeFilter) -> torch.Tensor:
    """Filter value at signed distance ``x`` (in filter units), as torch's ``aa_filter``."""
    x = x.abs()
    if mode == "bilinear":
        return torch.clamp(1.0 - x, min=0.0)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))  # noqa: PLR2004


def resample_weights(
    length: int | torch.SymInt,
    size: int,
    mode: ResizeFilter = "bilinear",
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int | torch.SymInt]:
    """Input taps and weights of an antialiased resize of one axis from ``length`` to ``size``.

    Every position is computed in integers: the filter centre of output pixel ``i`` is ``(2i + 1) length / (2 size)``
    input pixels, so the first tap and each tap's signed distance from the centre have integer numerators over
    ``2 size`` and ``2 max(length, size)``; only the distance, a number of at most a few filter widths, becomes a
    float. A runtime that computes in bfloat16 (8 significant bits; OpenVINO's CPU default on CPUs with native bf16)
    keeps integers exact, whereas float positions such as ``383.5`` would round there to ``384``: taps a pixel off,
    filter weights computed from distances off by up to a pixel.

    Args:
        length: input length of the axis (a symbolic int while exporting).
        size: output length.
        mode: ``"bilinear"`` or ``"bicubic"``.
        device: device of the returned tensors.

    Returns:
        ``(index, weight, taps)``: ``index`` ``(taps, size)`` int64 input positions (clamped into the
        axis; a clamped tap has weight 0), ``weight`` ``(taps, size)`` float32 summing to 1 over taps.
    """
    radius = _RADIUS[mode]
    length_t = torch.scalar_tensor(length, dtype=torch.int64, device=device)
    wide = torch.clamp(length_t, min=size)  # length * stretch: the filter widens by length / size only when shrinking
    # Pillow's window: at most ceil(2 * radius * stretch) input pixels have a non-zero weight.
    taps = torch.sym_max((2 * radius * length + size - 1) // size, 2 * radius)
    twice_out = 2 * torch.arange(size, dtype=torch.int64, device=device) + 1  # 2i + 1
    # first tap: floor(centre - radius * stretch + 0.5), clamped at 0. `//` exports as integer operations, where
    # torch.div(rounding_mode=...) exports as a float division (which such a runtime would compute in bf16).
    first = ((twice_out * length_t - 2 * radius * wide + size) // (2 * size)).clamp(min=0)
    position = first + torch.arange(taps, dtype=torch.int64, device=device)[:, None]
    # (position + 0.5 - centre) / stretch = ((2 position + 1) size - (2i + 1) length) / (2 length * stretch)
    distance = ((2 * position + 1) * size - twice_out * length_t).to(torch.float32) / (2 * wide).to(torch.float32)
    weight = _filter_weights(distance, mode)
    weight = weight * (position < length_t)  # taps past the end carry no weight; the rest renormalise
    weight = weight / weight.sum(dim=0, keepdim=True)
    index = torch.minimum(position, length_t - 1)
    return index, weight, taps


def _resample(image: torch.Tensor, axis: int, size: int, mode: ResizeFilter) -> torch.Tensor:
    """Antialiased resize of one axis (``-1`` or ``-2``) of ``image`` to ``size``.

    Each output pixel is its heaviest tap plus the weighted differences of all taps from it, ``x_r + sum_k w_k (x_k -
    x_r)``, which equals ``sum_k w_k x_k`` as the weights sum to 1. In bfloat16 the weights carry relative errors of
    2^-8: the plain sum turns them into an error of that share of the pixel's brightness (a pattern repeating with
    the filter's phase), the differences only into that share of the local contrast. At the training size the
    heaviest tap has weight 1 and the others 0, so the output is the input, bit for bit, in any precision.
    """
    index, weight, taps = resample_weights(image.shape[axis], size, mode, image.device)
    gathered = torch.index_select(image, axis, index.reshape(-1))
    # Taps outermost: the weighted sum then adds whole contiguous rows, which OpenVINO vectorises.
    gathered = gathered.unflatten(axis, (taps, size))
    heaviest = torch.index_select(image, axis, index.gather(0, weight.argmax(dim=0, keepdim=True)).reshape(-1))
    if axis == -2:  # noqa: PLR2004
        weight = weight[..., None]
    return heaviest + (weight * (gathered - heaviest.unsqueeze(axis - 1))).sum(dim=axis - 1)


def _resize_axis(image: torch.Tensor, axis: int, size: int, mode: ResizeFilter) -> torch.Tensor:
    if image.shape[axis] == size and not torch.compiler.is_exporting():
        return image
    return _resample(image, axis, size, mode)


def antialiased_resize(image: torch.Tensor, size: tuple[int, int], mode: ResizeFilter = "bilinear") -> torch.Tensor:
    """``torchvision.transforms.v2.functional.resize(image, size, antialias=True)`` for float images.

    Args:
        image: ``(..., H, W)`` float tensor.
        size: ``(height, width)`` of the result.
        mode: ``"bilinear"`` (torchvision's default) or ``"bicubic"``.

    Returns:
        ``(..., height, width)`` tensor. Width is resampled first, then height, as torch does.
    """
    if mode not in RESIZE_FILTERS:
        msg = f"mode must be one of {RESIZE_FILTERS}, got {mode!r}."
        raise ValueError(msg)
    if not image.is_floating_point():
        msg = f"antialiased_resize needs a float image, got {image.dtype}."
        raise TypeError(msg)
    height, width = (int(v) for v in size)
    image = _resize_axis(image, -1, width, mode)
    return _resize_axis(image, -2, height, mode)


class AntialiasedResize(nn.Module):
    """Module form of :func:`antialiased_resize`: any ``(N, C, H, W)`` -> ``(N, C, *size)``.

    Args:
        size: ``(height, width)`` of the output.
        mode: ``"bilinear"`` or ``"bicubic"``.
    """

    def __init__(self, size: tuple[int, int], mode: ResizeFilter = "bilinear") -> None:
        super().__init__()
        if mode not in RESIZE_FILTERS:
            msg = f"mode must be one of {RESIZE_FILTERS}, got {mode!r}."
            raise ValueError(msg)
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Resize ``image`` to ``self.size``."""
        return antialiased_resize(image, self.size, self.mode)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"
