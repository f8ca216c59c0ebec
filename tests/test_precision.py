"""Precision: the plugin's OpenVINO paths compile in float32 (read back from the compiled model), reduced precision
only on request and only where the CPU has it; bf16 emulated in torch, and what it does to FOD's score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_fod import Fod
from anomalib_fod.deploy import load_rgb
from anomalib_fod.inference import OpenVINOInferencer, OpenVINOModel, PrecisionError, precision_name
from anomalib_fod.models.fod.fitting import TrainingImages, fit_residual_statistics
from anomalib_fod.models.pre_processing import apply_for_export
from anomalib_fod.models.resize import antialiased_resize
from anomalib_fod.precision import emulate_precision, round_to

from fod_helpers import EMBEDDED_DATA_ROOT, TINY

ov = pytest.importorskip("openvino")
ops = pytest.importorskip("openvino.opset13")

CHANNELS = 8
# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most this share of it.
BF16_UNIT_ROUNDOFF = 2.0**-8


def conv_weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32)


def conv_model() -> object:
    """``(N, 3, H, W)`` -> a 3x3 convolution to 8 channels, plus 1: an op OpenVINO runs in bf16 when it may."""
    image = ops.parameter(ov.PartialShape([-1, 3, -1, -1]), ov.Type.f32, name="input")
    conv = ops.convolution(image, ops.constant(conv_weight()), [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([ops.add(conv, ops.constant(np.float32(1.0)))], [image], "conv")


def torch_conv(image: np.ndarray) -> torch.Tensor:
    return F.conv2d(torch.from_numpy(image), torch.from_numpy(conv_weight()), padding=1) + 1.0


def sample_image() -> np.ndarray:
    return np.random.default_rng(1).random((1, 3, 16, 24), dtype=np.float32)


def runtime_precisions(model: OpenVINOModel) -> set[str]:
    """The precisions the compiled graph's convolutions run in, from OpenVINO's runtime model."""
    nodes = model.compiled.get_runtime_model().get_ordered_ops()
    return {
        node.get_rt_info()["runtimePrecision"].astype(str)
        for node in nodes
        if node.get_rt_info()["layerType"].astype(str) == "Convolution"
    }


def cpu_capabilities() -> list[str]:
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def test_compiled_in_float32_by_default_read_back_from_the_compiled_model() -> None:
    model = OpenVINOModel(conv_model())
    assert model.precision == "f32"
    assert runtime_precisions(model) == {"f32"}
    result = model(sample_image())
    np.testing.assert_allclose(next(iter(result.values())), torch_conv(sample_image()).numpy(), rtol=1e-5, atol=1e-5)


def test_the_devices_own_precision_is_its_default() -> None:
    model = OpenVINOModel(conv_model(), precision="device")
    assert model.precision == precision_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


@pytest.mark.skipif(
    "BF16" not in cpu_capabilities(),
    reason=f"this CPU has no native bf16 (OpenVINO's CPU capabilities: {', '.join(cpu_capabilities())})",
)
def test_bf16_on_request_rounds_as_the_torch_emulation_does() -> None:
    """OpenVINO's bf16 convolution takes its input and weights rounded to bf16 and sums in float32: what the emulation
    does to every operation (here the graph's last node, whose result OpenVINO keeps in float32)."""
    model = OpenVINOModel(conv_model(), precision="bf16")
    assert model.precision == "bf16"
    assert runtime_precisions(model) == {"bf16"}
    got = next(iter(model(sample_image()).values()))
    exact = torch_conv(sample_image()).numpy()
    bf16 = torch.bfloat16
    rounded_inputs = F.conv2d(
        round_to(torch.from_numpy(sample_image()), bf16), round_to(torch.from_numpy(conv_weight()), bf16), padding=1
    ) + 1.0
    # bf16's 8-bit inputs move sums of 27 products far beyond float32 rounding...
    assert np.abs(got - exact).max() > 1e-3  # noqa: PLR2004
    # ...by exactly what rounding the inputs does, up to float32 summation order.
    np.testing.assert_allclose(got, rounded_inputs.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("precision", "capability"), [("bf16", "BF16"), ("f16", "FP16")])
def test_a_precision_the_cpu_lacks_is_refused(precision: str, capability: str) -> None:
    if capability in cpu_capabilities():
        pytest.skip(f"this CPU computes in {precision} natively")
    with pytest.raises(PrecisionError, match=rf"asked for precision '{precision}'.*not compute in {precision} natively"):
        OpenVINOModel(conv_model(), precision=precision)


def test_the_precision_is_given_once_and_checked() -> None:
    with pytest.raises(PrecisionError, match="give the precision once"):
        OpenVINOModel(conv_model(), precision="bf16", config={"INFERENCE_PRECISION_HINT": "f32"})
    assert OpenVINOModel(conv_model(), precision=None, config={"INFERENCE_PRECISION_HINT": "f32"}).precision == "f32"
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVINOModel(conv_model(), precision="f64")


def test_the_inferencer_compiles_in_float32_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the inferencer writes ./openvino_cache, as anomalib's does
    xml = tmp_path / "model.xml"
    ov.save_model(conv_model(), str(xml))
    assert OpenVINOInferencer(path=xml).precision == "f32"  # anomalib's default device, AUTO
    assert OpenVINOInferencer(path=xml, device="CPU").precision == "f32"
    default = precision_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    assert OpenVINOInferencer(path=xml, device="CPU", precision="device").precision == default


# --------------------------------------------------------------------------- emulation in torch


def test_emulation_rounds_every_result_and_restores_the_weights() -> None:
    linear = torch.nn.Linear(16, 4)
    weight = linear.weight.detach().clone()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    bf16 = torch.bfloat16
    with torch.no_grad(), emulate_precision(linear):
        got = linear(x)
    want = round_to(round_to(x, bf16) @ round_to(weight, bf16).T + round_to(linear.bias.detach(), bf16), bf16)
    torch.testing.assert_close(got, want, rtol=BF16_UNIT_ROUNDOFF, atol=0)
    assert torch.equal(got, round_to(got, bf16))  # every value is a bf16 value
    assert torch.equal(linear.weight, weight)
    with pytest.raises(RuntimeError), torch.no_grad(), emulate_precision(linear):
        linear(torch.randn(3, 5))  # a forward that fails leaves no rounded weight behind
    assert torch.equal(linear.weight, weight)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, linear.bias))  # no rounding after the block


def test_emulation_rounds_the_resize_and_leaves_its_positions_alone() -> None:
    """The exported resize in emulated bf16: its taps' positions are integers (exact in any precision), its weighted
    differences and sums are rounded, a few roundings of values below 1 in all."""
    image = torch.rand(1, 3, 256, 400, generator=torch.Generator().manual_seed(0))

    class Resize(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return antialiased_resize(image, (256, 256))

    resize = Resize()
    with torch.no_grad(), emulate_precision(resize):
        rounded = resize(image)
    exact = antialiased_resize(image, (256, 256))
    # rounded input, weights, products and sum: a few roundings of values in [0, 1]
    assert 0 < (rounded - exact).abs().max() <= 4 * BF16_UNIT_ROUNDOFF


@pytest.fixture(scope="module")
def fitted_fod() -> tuple[Fod, torch.Tensor]:
    """A tiny FOD (untrained Transformers, ImageNet backbone) with its references and residual statistics fitted on
    the embedded battery_weld training images at 64 px; every 8th test image, pre-processed."""
    torch.manual_seed(0)
    # exposure gains act on unnormalised images: these are normalised, and fitted as they are
    model = Fod(image_size=64, visualizer=False, intensity_gains=(1.0,), **TINY).eval()
    transform = model.pre_processor.transform

    def load(paths: list[Path]) -> torch.Tensor:
        return torch.cat([apply_for_export(transform, torch.from_numpy(load_rgb(p).transpose(2, 0, 1).copy())[None]) for p in paths])

    root = EMBEDDED_DATA_ROOT / "battery_weld"
    with torch.no_grad():
        images = load(sorted((root / "train").glob("*/*.png")))
        model.model.set_mean_reference([f.mean(0) for f in model.model.extract_features(images)])
        # the whole fit at the training exposures, the nearest-token score's bank and z-units included
        fit_residual_statistics(model.model, TrainingImages(list(images.split(8)), None, torch.device("cpu"), False))
    return model, load(sorted((root / "test").glob("*/*.png"))[::8])


def bf16_score_deviation(model: Fod, images: torch.Tensor, modules: list[torch.nn.Module]) -> torch.Tensor:
    """Deviation of each raw image score with ``modules`` in emulated bf16, in units of the exact scores' spread over
    ``images``: the distance a threshold between normal and defective images has to work with. (The default score
    is in z-units of the training images, so a normal image's score is near 0 and a deviation relative to the score
    itself says nothing.)"""
    with torch.no_grad():
        exact = model.model(images).pred_score
        with emulate_precision(modules):
            reduced = model.model(images).pred_score
    return (reduced - exact).abs() / (exact.max() - exact.min())


def test_the_scoring_in_bf16_moves_the_score_by_its_own_rounding_alone(fitted_fod: tuple[Fod, torch.Tensor]) -> None:
    """The whitened residual's distance and the nearest-token distance are no sums of nearly cancelling terms: in
    bf16 they move the image score by no more than their operations' own roundings. The residual, centring,
    whitening product, squares, sum, root, z-units, blend, upsampling, level weighting and blur round once each: at
    most 11 roundings of at most 2^-8 of the largest score, whose magnitude is below the spread here (6.7 against
    7.9), so 11 * 2^-8 = 0.043 of the spread. Measured: 0.002 here."""
    model, images = fitted_fod
    deviation = bf16_score_deviation(model, images, [model.model.anomaly_map_generator])
    assert deviation.max() > 0  # the emulation acted
    assert deviation.max() <= 11 * BF16_UNIT_ROUNDOFF


def test_the_whole_model_in_bf16_stays_within_its_measured_bound(fitted_fod: tuple[Fod, torch.Tensor]) -> None:
    """The whole model in bf16: the backbone's rounding, carried through 16 convolutions, moves the features, and
    the whitened score magnifies that in the directions the training residuals barely vary in. Measured: up to
    0.032 of the scores' spread here. Bound 0.08: a change that makes the score more than twice as sensitive to
    the features' precision (e.g. weaker shrinkage of the covariance) fails here before it reaches a bf16 CPU."""
    model, images = fitted_fod
    deviation = bf16_score_deviation(model, images, [model.model])
    assert deviation.max() <= 0.08  # noqa: PLR2004
