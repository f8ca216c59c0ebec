"""Export rules for FOD: a fixed image size, checked before anomalib's exporter runs.

FOD's inter-correlation branch compares every image token with reference features computed
on the token grid of the training images, and both its positional encodings and its Gaussian
target correlations are built from that grid. An exported graph therefore needs the image size
the model was trained with (the pre-processor's output size). A dynamic height/width would
either break the reference grid (no resize in the graph) or resize inside the graph without
antialiasing (which differs from the training pipeline), so it is refused with an explanation.
The batch axis stays dynamic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

SPATIAL_AXES = (2, 3)


class DynamicExportError(ValueError):
    """Raised when a dynamic image height/width is requested for a FOD export."""


def _is_dynamic(dimension: object) -> bool:
    """Whether one entry of a ``dynamic_shapes`` spec makes its axis dynamic."""
    if dimension is None or dimension is torch.export.Dim.STATIC:
        return False
    return not (isinstance(dimension, int) and not isinstance(dimension, bool))


def _tensor_spec(spec: object) -> dict[int, object]:
    """Reduce a single-input ``dynamic_shapes`` spec to ``{axis: dimension}``."""
    while True:
        if isinstance(spec, Mapping):
            if all(isinstance(axis, int) for axis in spec):
                return dict(spec)
            if len(spec) == 1:  # {"batch": {...}} - named argument wrapper
                spec = next(iter(spec.values()))
                continue
            return {}
        if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
            if len(spec) == 1 and (spec[0] is None or isinstance(spec[0], (Mapping, Sequence))):
                spec = spec[0]
                continue
            return dict(enumerate(spec))
        return {}


def dynamic_spatial_axes(kwargs: Mapping[str, Any]) -> list[int]:
    """Image axes (2 = height, 3 = width) that ``dynamic_axes``/``dynamic_shapes`` make dynamic."""
    axes: set[int] = set()
    dynamic_axes = kwargs.get("dynamic_axes")
    if isinstance(dynamic_axes, Mapping):
        output_names = set(kwargs.get("output_names") or ())
        input_names = list(kwargs.get("input_names") or ["input"])
        for name, spec in dynamic_axes.items():
            if name in output_names or (name not in input_names and name != "input"):
                continue
            keys = spec.keys() if isinstance(spec, Mapping) else spec
            axes.update(axis for axis in keys if axis in SPATIAL_AXES)
    dynamic_shapes = kwargs.get("dynamic_shapes")
    if dynamic_shapes is not None:
        spec = _tensor_spec(dynamic_shapes)
        axes.update(axis for axis, dim in spec.items() if axis in SPATIAL_AXES and _is_dynamic(dim))
    return sorted(axes)


def _why(grid: str) -> str:
    return (
        f"FOD's reference features (inter-correlation branch) were computed on the {grid} token grid of "
        "the training images, and its positional encodings and target correlations are built from that "
        "grid, so the exported graph needs a fixed image size."
    )


def check_static_export(kwargs: Mapping[str, Any], grid: str = "training") -> None:
    """Refuse a dynamic height/width in ONNX export arguments, saying why.

    Args:
        kwargs: the keyword arguments meant for ``torch.onnx.export``.
        grid: the reference token grid, e.g. ``"16x16"``, for the message.

    Raises:
        DynamicExportError: if height or width is marked dynamic.
    """
    axes = dynamic_spatial_axes(kwargs)
    if axes:
        names = " and ".join("height" if axis == 2 else "width" for axis in axes)  # noqa: PLR2004
        msg = (
            f"FOD cannot be exported with a dynamic image {names}. {_why(grid)} Export with "
            "input_size=(H, W) (default: the training size) and no height/width in dynamic_axes/"
            "dynamic_shapes (a dynamic batch axis is fine), then resize images to that size before "
            "inference (`anomalib-fod predict-folder` does this)."
        )
        raise DynamicExportError(msg)


def default_export_size(model_input_size: Sequence[int] | None, grid: str = "training") -> tuple[int, int]:
    """The fixed export size used when ``input_size`` is not given: the pre-processor's output size.

    Raises:
        DynamicExportError: if the pre-processor does not resize to a fixed size.
    """
    if model_input_size is None:
        msg = (
            f"FOD needs input_size=(H, W) for export: {_why(grid)} The model's pre-processor does not "
            "resize to a fixed size, so pass the image size the model was trained with."
        )
        raise DynamicExportError(msg)
    height, width = (int(v) for v in model_input_size)
    return height, width
