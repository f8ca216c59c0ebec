"""The pre-processing that a model's ``forward`` (and so every exported graph) runs.

anomalib's ``PreProcessor.forward`` applies an *export* copy of the training transform in which
``Resize`` has antialiasing switched off, because torch's exporter could not emit it. Images that
are not already at the training size then reach the model filtered differently from training
(and from ``Engine.predict``). Here the training transform itself runs in eager mode, and while
exporting, the same transform with each antialiased ``Resize`` replaced by
:func:`~anomalib_fod.models.resize.antialiased_resize`, which exports exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import Compose, Normalize, Resize, Transform

from .resize import ResizeFilter, antialiased_resize

_FILTERS: dict[InterpolationMode, ResizeFilter] = {
    InterpolationMode.BILINEAR: "bilinear",
    InterpolationMode.BICUBIC: "bicubic",
}
# Transforms that never change an image's height or width.
_SIZE_PRESERVING = (Normalize,)


class UnsupportedExportTransformError(ValueError):
    """A pre-processing step that an exported graph cannot reproduce exactly."""


def _steps(transform: Transform | None) -> Iterator[Transform]:
    """The leaf transforms of a (possibly nested) ``Compose``, in order."""
    if transform is None:
        return
    if isinstance(transform, Compose):
        for step in transform.transforms:
            yield from _steps(step)
    else:
        yield transform


def _fixed_size(resize: Resize) -> tuple[int, int] | None:
    """``(h, w)`` if ``resize`` maps every image to that size, else ``None`` (e.g. ``Resize(256)``)."""
    size = resize.size
    if resize.max_size is not None or size is None or len(size) != 2:  # noqa: PLR2004
        return None
    return int(size[0]), int(size[1])


def training_resize(transform: Transform | None) -> tuple[int, int] | None:
    """The ``(height, width)`` every image is resized to before any other size-dependent step.

    This is what lets an exported graph accept images of any size: the transform's first step
    that depends on the image size is a ``Resize`` to a fixed ``(height, width)``.

    Returns:
        That size, or ``None`` when the transform has no such resize (no resize at all, a
        shorter-side ``Resize(256)``, or a crop first).
    """
    for step in _steps(transform):
        if isinstance(step, Resize):
            return _fixed_size(step)
        if not isinstance(step, _SIZE_PRESERVING):
            return None
    return None


def _filter_of(resize: Resize) -> ResizeFilter | None:
    """The resize's filter if it is one :func:`antialiased_resize` has (torchvision keeps a string or an enum)."""
    try:
        return _FILTERS.get(InterpolationMode(resize.interpolation))
    except ValueError:
        return None


def _resize_for_export(resize: Resize, image: torch.Tensor) -> torch.Tensor:
    mode = _filter_of(resize)
    if not resize.antialias or mode is None:
        # No antialiasing in training either (or a mode that has none, e.g. nearest): anomalib's
        # export copy of the step is then exactly the training step.
        return get_exportable_transform(resize)(image)
    size = _fixed_size(resize)
    if size is None:
        height, width = image.shape[-2:]
        if not (isinstance(height, int) and isinstance(width, int)):
            msg = (
                f"the pre-processor's {resize} computes its output size from the image's aspect ratio, which an "
                "exported graph for images of any size cannot do exactly. Export with input_size=(H, W) (a "
                "graph for that image size), or train with Resize((height, width))."
            )
            raise UnsupportedExportTransformError(msg)
        # Fixed input: torchvision computes the output size from the concrete input size.
        size = tuple(resize(torch.empty(1, height, width, device="meta")).shape[-2:])
    return antialiased_resize(image, size, mode)


def apply_for_export(transform: Transform | None, image: torch.Tensor) -> torch.Tensor:
    """Apply ``transform`` to a ``(N, C, H, W)`` batch the way an exported graph does.

    Antialiased bilinear/bicubic ``Resize`` steps use :func:`antialiased_resize` (exact and
    exportable); every other step is anomalib's export version of it (e.g. ``CenterCrop`` ->
    ``ExportableCenterCrop``).
    """
    for step in _steps(transform):
        image = _resize_for_export(step, image) if isinstance(step, Resize) else get_exportable_transform(step)(image)
    return image


def pre_process(pre_processor: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Pre-process a ``(N, C, H, W)`` batch in ``forward``: the training transform, exportably.

    A ``PreProcessor`` subclass with its own ``forward`` keeps it.
    """
    if not isinstance(pre_processor, PreProcessor) or type(pre_processor).forward is not PreProcessor.forward:
        return pre_processor(image)
    transform = pre_processor.transform
    if transform is None:
        return image
    if torch.compiler.is_exporting():
        return apply_for_export(transform, image)
    return transform(image)
