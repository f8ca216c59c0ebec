"""Export rules shared by the plugin's models: which image sizes an exported graph accepts.

A model whose pre-processor resizes every image to a fixed ``(height, width)`` (the default) is
exported for images of *any* size: the graph's input height and width are dynamic and the graph
resizes to the training size with the training filter (see ``pre_processing.py``), so its
results match ``Engine.predict`` on the same files. The anomaly map comes back at the training
size, as anomalib's own exports return it at the pre-processed size.

A graph has a fixed input size when the user asks for one (``input_size=(H, W)``, anomalib's
meaning: a static input shape) or when the pre-processor does not resize to a fixed size; the
models then need their training size (FOD's reference token grid, CDO's top-k score and the
fitted normalisation), so a dynamic height/width is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

SPATIAL_AXES = (2, 3)


class DynamicExportError(ValueError):
    """Raised when a graph for images of any size is requested but cannot be exact."""


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


def export_input_size(
    input_size: Sequence[int] | None,
    onnx_kwargs: Mapping[str, Any],
    training_resize: tuple[int, int] | None,
    model_input_size: Sequence[int] | None,
    model_name: str,
    fixed_size_reason: str,
) -> tuple[int, int] | None:
    """The ``input_size`` to hand to anomalib's exporter: ``None`` for a graph that takes any size.

    Args:
        input_size: what the user asked for (``None``: not given).
        onnx_kwargs: the keyword arguments meant for ``torch.onnx.export``.
        training_resize: the fixed size the pre-processor resizes every image to, if any.
        model_input_size: the pre-processor's output size (anomalib's ``model.input_size``).
        model_name: for messages, e.g. ``"FOD"``.
        fixed_size_reason: why the model needs its training size, for messages.

    Raises:
        DynamicExportError: dynamic height/width requested without a fixed-size resize to do it
            exactly, or no size known at all.
    """
    spatial = dynamic_spatial_axes(onnx_kwargs)
    user_spec = "dynamic_axes" in onnx_kwargs or "dynamic_shapes" in onnx_kwargs
    if spatial and training_resize is None:
        names = " and ".join("height" if axis == 2 else "width" for axis in spatial)  # noqa: PLR2004
        msg = (
            f"{model_name} cannot be exported with a dynamic image {names}: its pre-processor does not resize "
            f"every image to a fixed size, and {fixed_size_reason} Export with input_size=(H, W) and no "
            "height/width in dynamic_axes/dynamic_shapes (a dynamic batch axis is fine), or train with a "
            "pre-processor that resizes to (height, width) (the default): such a model exports a graph for "
            "images of any size."
        )
        raise DynamicExportError(msg)
    if input_size is not None:
        return int(input_size[0]), int(input_size[1])
    if training_resize is not None and (spatial or not user_spec):
        return None
    if model_input_size is None:
        msg = (
            f"{model_name} needs input_size=(H, W) for export: its pre-processor does not resize to a fixed "
            f"size, and {fixed_size_reason} Pass the image size the model was trained with."
        )
        raise DynamicExportError(msg)
    return int(model_input_size[0]), int(model_input_size[1])
