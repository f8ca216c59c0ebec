"""PyTorch model of CDO: a frozen pre-trained teacher and a same-architecture student from scratch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_fod.backbone import FeatureExtractor, resolve_layers

from .anomaly_map import AnomalyMapGenerator

# The paper's HRNet32 gives its three branches at 1/4, 1/8 and 1/16 of the input.
DEFAULT_STRIDES = (4, 8, 16)


@dataclass
class CdoFeatures:
    """Training-mode output: unit-length features per level, each ``(B, C_i, h_i, w_i)``."""

    teacher: list[torch.Tensor]
    student: list[torch.Tensor]


def select_layers(backbone: str, layers: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """timm ``feature_info`` indices and module names of the CDO levels of ``backbone``.

    ``None`` picks the last stage at each of the strides 4, 8 and 16 (EfficientNet-Lite:
    ``blocks.1``, ``blocks.2``, ``blocks.4``; ResNets: ``layer1``, ``layer2``, ``layer3``).
    """
    probe = timm.create_model(backbone, pretrained=False)  # architecture only, never downloads
    if layers is not None:
        return resolve_layers(probe, layers)
    info = list(probe.feature_info)
    indices = []
    for stride in DEFAULT_STRIDES:
        candidates = [i for i, entry in enumerate(info) if entry["reduction"] == stride]
        if not candidates:
            names = [entry["module"] for entry in info]
            msg = f"backbone '{backbone}' has no stage with stride {stride}; pass `layers` explicitly ({names})."
            raise ValueError(msg)
        indices.append(candidates[-1])
    return indices, [info[i]["module"] for i in indices]


class CdoModel(nn.Module):
    """CDO: Collaborative Discrepancy Optimization (Cao et al., IEEE TII 2023).

    Args:
        backbone: timm CNN used for both networks.
        layers: feature layers (``None``: the stride-4, 8 and 16 stages).
        pre_trained: ImageNet weights for the teacher (offline for EfficientNet-Lite, see
            :mod:`anomalib_fod.backbone`). The student always starts from random weights.
        weights_path: local timm state dict for the teacher.
        blur_sigma: Gaussian blur on the anomaly map.
        top_fraction: share of the map's largest values averaged into the image score.

    Shapes:
        training: ``(B, 3, H, W)`` -> :class:`CdoFeatures`;
        eval: ``(B, 3, H, W)`` -> ``InferenceBatch(pred_score (B,), anomaly_map (B, 1, H, W))``.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        weights_path: str | None = None,
        blur_sigma: float = 4.0,
        top_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        indices, names = select_layers(backbone, layers)
        # FeatureExtractor freezes its weights and keeps itself in eval mode (BatchNorm included).
        self.teacher = FeatureExtractor(backbone, names, pre_trained, weights_path)
        self.student = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=indices)
        self.layers = names
        self.anomaly_map_generator = AnomalyMapGenerator(blur_sigma, top_fraction)

    def extract_features(self, images: torch.Tensor) -> CdoFeatures:
        """Unit-length (over channels) teacher and student features of ``(B, 3, H, W)`` images."""
        with torch.no_grad():
            teacher = [F.normalize(f, p=2, dim=1) for f in self.teacher(images)]
        student = [F.normalize(f, p=2, dim=1) for f in self.student(images)]
        return CdoFeatures(teacher=teacher, student=student)

    def forward(self, images: torch.Tensor) -> CdoFeatures | InferenceBatch:
        """Features in training; ``InferenceBatch`` with ``(B,)`` scores and ``(B, 1, H, W)`` maps in eval."""
        features = self.extract_features(images)
        if self.training:
            return features
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        anomaly_map, pred_score = self.anomaly_map_generator(features.teacher, features.student, image_size)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
