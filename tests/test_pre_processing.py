"""The pre-processing in the models' ``forward`` (what exports contain) and the export size rules.

No training: an untrained tiny CDO (random student, offline teacher weights not needed) is enough to
check that ``forward`` pre-processes exactly as training and ``Engine.predict`` do, for images of
any size, and that anomalib's default ``forward`` (resize without antialiasing) would not.
"""

from __future__ import annotations

import pytest
import torch
from anomalib.models import AnomalibModule
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import CenterCrop, Compose, InterpolationMode, Normalize, Resize

from anomalib_fod import Cdo
from anomalib_fod.models.export import DynamicExportError, export_input_size
from anomalib_fod.models.pre_processing import (
    UnsupportedExportTransformError,
    apply_for_export,
    pre_process,
    training_resize,
)

NORMALIZE = Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        (Compose([Resize((64, 96)), NORMALIZE]), (64, 96)),
        (Compose([NORMALIZE, Compose([Resize((32, 32))])]), (32, 32)),  # nested, after a size-preserving step
        (Resize((48, 48), interpolation=InterpolationMode.BICUBIC), (48, 48)),
        (Compose([Resize(64), CenterCrop(56)]), None),  # shorter side: size depends on the aspect ratio
        (Compose([Resize((64, 64), max_size=80)]), None),
        (Compose([CenterCrop(56), Resize((64, 64))]), None),  # a crop first
        (Compose([NORMALIZE]), None),
        (None, None),
    ],
)
def test_training_resize(transform: object, expected: tuple[int, int] | None) -> None:
    assert training_resize(transform) == expected


def test_export_input_size_rules() -> None:
    reason = "it needs its training size."
    # Default export of a model that resizes: any size.
    assert export_input_size(None, {}, (64, 64), (64, 64), "M", reason) is None
    # input_size: anomalib's static shape, whatever the pre-processor.
    assert export_input_size((30, 40), {}, (64, 64), (64, 64), "M", reason) == (30, 40)
    assert export_input_size((30, 40), {}, None, None, "M", reason) == (30, 40)
    # The user's own axes without height/width: a fixed graph at the pre-processed size.
    assert export_input_size(None, {"dynamic_axes": {"input": {0: "b"}}}, (64, 64), (64, 64), "M", reason) == (64, 64)
    assert export_input_size(None, {"dynamic_axes": {"input": {0: "b", 3: "w"}}}, (64, 64), (64, 64), "M", reason) is None
    # No resize to a fixed size: fixed at the pre-processed size, or an error naming input_size.
    assert export_input_size(None, {}, None, (56, 56), "M", reason) == (56, 56)
    with pytest.raises(DynamicExportError, match="input_size"):
        export_input_size(None, {}, None, None, "M", reason)
    with pytest.raises(DynamicExportError, match=r"dynamic image height and width.*needs its training size"):
        export_input_size((64, 64), {"dynamic_axes": {"input": {2: "h", 3: "w"}}}, None, None, "M", reason)


@pytest.fixture(scope="module")
def untrained_cdo() -> Cdo:
    torch.manual_seed(0)
    return Cdo(pre_trained=False, image_size=64, post_processor=False, evaluator=False, visualizer=False).eval()


@pytest.mark.parametrize("size", [(64, 64), (100, 150), (257, 31)])
def test_forward_pre_processes_as_training(untrained_cdo: Cdo, size: tuple[int, int]) -> None:
    """``forward`` = the training transform (as the PreProcessor callback applies it) + the model."""
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = untrained_cdo(images)
        expected = untrained_cdo.model(untrained_cdo.pre_processor.transform(images))
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(got.pred_score, expected.pred_score, rtol=0, atol=0)


def test_anomalib_default_forward_differs_on_other_sizes(untrained_cdo: Cdo) -> None:
    """What the override fixes: anomalib's forward resizes without antialiasing."""
    images = torch.rand(1, 3, 256, 400, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = untrained_cdo(images).anomaly_map
        anomalib = AnomalibModule.forward(untrained_cdo, images).anomaly_map
    assert (ours - anomalib).abs().max() > 1e-3  # noqa: PLR2004


def test_export_path_matches_eager_path() -> None:
    """Within float32 rounding: the exported resize places its taps exactly, torchvision rounds its filter centres
    (up to 3.9e-6 apart after the normalisation's division by the standard deviations, about 1e-6 of a pixel)."""
    transform = Compose([Resize((48, 40)), NORMALIZE])
    images = torch.rand(2, 3, 100, 150, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(apply_for_export(transform, images), transform(images), rtol=0, atol=1e-5)
    # A shorter-side resize is exact for a concrete input size too.
    transform = Compose([Resize(40), CenterCrop(32), NORMALIZE])
    torch.testing.assert_close(apply_for_export(transform, images), transform(images), rtol=0, atol=1e-5)


def test_shorter_side_resize_cannot_be_exported_for_any_size() -> None:
    class Step(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return apply_for_export(Compose([Resize(40)]), images)

    dims = ({2: torch.export.Dim("height"), 3: torch.export.Dim("width")},)
    with pytest.raises(UnsupportedExportTransformError, match="aspect ratio"):
        torch.export.export(Step(), (torch.rand(1, 3, 50, 60),), dynamic_shapes=dims, strict=False)


def test_custom_pre_processor_forward_is_kept() -> None:
    class Doubling(PreProcessor):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return batch * 2

    images = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(pre_process(Doubling(), images), images * 2)
    assert pre_process(PreProcessor(transform=None), images) is images
