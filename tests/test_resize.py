"""The exportable antialiased resize against torchvision's, in eager mode, OpenVINO and ONNX Runtime.

``antialiased_resize`` must give torchvision's ``resize(antialias=True)`` for any input size (shrinking,
enlarging, unchanged axes, tiny images, extreme aspect ratios), and a graph exported with dynamic
height and width must give the same in every runtime. Float32 rounding only: measured <= 3e-7 for
bilinear and <= 8e-7 for bicubic on [0, 1] images, against 0.38 for OpenVINO's own ``Interpolate`` (which
ignores ``antialias``), plus what torchvision's own float32 filter centres add: the exported resize places its
taps exactly (integer arithmetic), torchvision's centre ``(i + 0.5) * scale`` and its taps' offsets from it are
each off by up to half an ulp of the position, so its weights and the pixels by a few ``2^-24`` times the axis
length (measured up to 1.4e-5 for a 700 px axis; the tests allow 4 ulps of the longest axis).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms.v2.functional import InterpolationMode, resize

from anomalib_fod.models.resize import AntialiasedResize, _resample, antialiased_resize, resample_weights

TOLERANCE = {"bilinear": 1e-6, "bicubic": 3e-6}
# Runtimes fuse and reorder the float32 sums (measured up to 1.9e-6 in OpenVINO).
RUNTIME_TOLERANCE = 1e-5
INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
TARGET = (48, 40)
# Shrink, enlarge, one axis unchanged, both unchanged, 1-2 px, long thin images.
SIZES = [(256, 400), (900, 900), (48, 40), (48, 97), (20, 40), (2, 3), (1, 1), (31, 1200), (1000, 41)]
# torch 2.14's antialiased kernel mis-resamples the height of an image that is 1 px wide after its
# horizontal pass (it repeats the first row), so the comparisons with torchvision keep the output
# at least 2 px wide; that case is checked against its known value in test_one_pixel_wide_image.


def reference(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return resize(image, list(size), interpolation=INTERPOLATION[mode], antialias=True)


def tolerance(mode: str, *lengths: int) -> float:
    """Float32 rounding of the sums, plus torchvision's float32 filter centres on axes of these lengths."""
    return TOLERANCE[mode] + 4 * 2.0**-24 * max(lengths)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", SIZES)
def test_eager_matches_torchvision(mode: str, shape: tuple[int, int]) -> None:
    image = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    expected = reference(image, TARGET, mode)
    got = antialiased_resize(image, TARGET, mode)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= tolerance(mode, *shape, *TARGET)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(2, 700),
    width=st.integers(2, 700),
    out_height=st.integers(1, 300),
    out_width=st.integers(2, 300),
    mode=st.sampled_from(["bilinear", "bicubic"]),
)
def test_eager_matches_torchvision_for_any_sizes(
    height: int,
    width: int,
    out_height: int,
    out_width: int,
    mode: str,
) -> None:
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))
    expected = reference(image, (out_height, out_width), mode)
    got = antialiased_resize(image, (out_height, out_width), mode)
    # Each output pixel sums about `shrink` inputs per axis in another order than torch does: float32
    # rounding of such sums grows like the square root of their length (measured: 1.5e-6 for 255 -> 1).
    shrink = max(height / out_height, width / out_width)
    bound = TOLERANCE[mode] * max(1.0, math.sqrt(shrink / 16)) + 4 * 2.0**-24 * max(height, width, out_height, out_width)
    assert (got - expected).abs().max().item() <= bound


def test_weights_cover_the_filter_window() -> None:
    """400 -> 256: each output pixel mixes 3-4 input pixels, weights sum to 1, never past the edge."""
    index, weight, taps = resample_weights(400, 256)
    assert index.shape == weight.shape == (taps, 256)
    torch.testing.assert_close(weight.sum(dim=0), torch.ones(256))
    used = (weight > 0).sum(dim=0)
    # A triangle stretched 1.5625x covers 3-4 pixels; at the borders it is cut (and renormalised).
    assert set(used[1:-1].tolist()) == {3, 4}
    assert int(used[0]) == int(used[-1]) == 2  # noqa: PLR2004
    assert int(index.min()) == 0 and int(index.max()) == 399  # noqa: PLR2004


def test_one_pixel_wide_image() -> None:
    """Enlarging a 2x1 column [0, 1] to 3x1: bilinear half-pixel sampling gives [0, 0.5, 1]."""
    column = torch.tensor([0.0, 1.0]).reshape(1, 1, 2, 1)
    torch.testing.assert_close(antialiased_resize(column, (3, 1)).flatten(), torch.tensor([0.0, 0.5, 1.0]))


def test_unchanged_axis_is_untouched() -> None:
    image = torch.rand(1, 3, *TARGET)
    assert antialiased_resize(image, TARGET) is image


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        AntialiasedResize(TARGET, "nearest")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float"):
        antialiased_resize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TARGET)


# --------------------------------------------------------------------------- exported graph


def export_any_size(module: torch.nn.Module, path: Path) -> Path:
    """ONNX (opset 18) of ``module`` with dynamic batch, height and width."""
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    torch.onnx.export(
        module.eval(),
        (torch.rand(2, 3, 32, 32),),
        str(path),
        dynamo=True,
        opset_version=18,
        dynamic_shapes=(dims,),
        input_names=["input"],
    )
    return path


@pytest.fixture(scope="module", params=["bilinear", "bicubic"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("onnxscript")
    mode = request.param
    return export_any_size(AntialiasedResize(TARGET, mode), tmp_path_factory.mktemp("resize") / f"{mode}.onnx"), mode


class _ResizeThenConvolve(torch.nn.Module):
    """The resize, then a 1x1 identity convolution: OpenVINO computes what precedes a convolution in bf16 where it
    may (a graph's tail after its last convolution or matmul stays float32)."""

    def __init__(self, size: tuple[int, int], mode: str) -> None:
        super().__init__()
        self.resize = AntialiasedResize(size, mode)
        self.identity = torch.nn.Conv2d(3, 3, 1, bias=False)
        self.identity.weight.data = torch.eye(3)[:, :, None, None]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.identity(self.resize(image))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_openvino_bf16_keeps_every_tap_in_place(mode: str, tmp_path: Path) -> None:
    """In bf16 (8 significant bits) a float position such as 383.5 rounds to 384: taps a pixel off and weights from
    wrong distances, which moved pixels of these random images by up to 0.45 and FOD's scores on 384x156 images to
    chance level; so did a floor division that the exporter writes in floats. With integer positions every value is
    only rounded a few times: the input, the differences from the heaviest tap and their weighted sum, the
    convolution's output, each by at most 2^-9 for values below 1, and the weights' own error times the local
    contrast (at most 1 here). A weight's error is its distance's two roundings (2^-8 each) times the filter's slope
    there: 8 * 2^-9 = 0.016 in all for the tent (slope 1, 2 taps upsampling); the cubic's slope reaches 1.5 at
    distances up to 2 over 4 taps, 0.06 in all (measured: 0.0065 and 0.033)."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    from anomalib_fod.inference import OpenVINOModel  # noqa: PLC0415

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no native bf16")
    for size in (TARGET, (256, 256)):
        model = OpenVINOModel(export_any_size(_ResizeThenConvolve(size, mode), tmp_path / f"{size[0]}.onnx"), "CPU", "bf16")
        for shape in [(128, 128), (156, 384), (256, 400), (900, 900), (31, 1200)]:
            image = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(1))
            got = next(iter(model(image.numpy()).values()))
            diff = np.abs(got - reference(image, size, mode).numpy()).max()
            assert diff <= (8 * 2.0**-9 if mode == "bilinear" else 0.06), (size, shape, diff)


def test_openvino_matches_torchvision_for_any_input_size(exported: tuple[Path, str]) -> None:
    ov = pytest.importorskip("openvino")
    from anomalib_fod.inference import OpenVINOModel  # noqa: PLC0415

    path, mode = exported
    compiled = OpenVINOModel(path, "CPU").compiled
    # The output shape is static: the rest of a model's graph keeps static shapes after the resize.
    assert compiled.output(0).get_partial_shape() == ov.PartialShape([-1, 3, *TARGET])
    for shape in SIZES:
        image = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(1))
        got = compiled(image.numpy())[0]
        diff = np.abs(got - reference(image, TARGET, mode).numpy()).max()
        assert diff <= (0.0 if shape == TARGET else RUNTIME_TOLERANCE), (shape, diff)  # at the target: a copy


def test_onnxruntime_matches_torchvision_for_any_input_size(exported: tuple[Path, str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    path, mode = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in SIZES:
        image = torch.rand(3, 3, *shape, generator=torch.Generator().manual_seed(2))
        (got,) = session.run(None, {"input": image.numpy()})
        diff = np.abs(got - reference(image, TARGET, mode).numpy()).max()
        assert diff <= (0.0 if shape == TARGET else RUNTIME_TOLERANCE), (shape, diff)  # at the target: a copy


def test_graph_has_no_branches(exported: tuple[Path, str]) -> None:
    """No ``If`` on the input size (OpenVINO 2026.4 gave wrong FOD scores through one)."""
    onnx = pytest.importorskip("onnx")
    path, _ = exported
    assert not [node for node in onnx.load(str(path)).graph.node if node.op_type in {"If", "Loop"}]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_unchanged_axis_weights_select_the_pixel_exactly(mode: str) -> None:
    """What the graph does with an axis already at the target size: weight 1 on the pixel, 0 elsewhere."""
    index, weight, taps = resample_weights(40, 40, mode)
    assert taps == 2 * (1 if mode == "bilinear" else 2)
    selected = (weight == 1.0).nonzero()
    assert selected[:, 1].tolist() == list(range(40))  # one tap of weight 1 per output pixel...
    assert index[selected[:, 0], selected[:, 1]].tolist() == list(range(40))  # ...on the pixel itself
    assert int((weight != 0).sum()) == 40  # every other tap weighs exactly 0  # noqa: PLR2004
    image = torch.rand(2, 3, 40, 40)
    torch.testing.assert_close(_resample(image, -1, 40, mode), image, rtol=0, atol=0)
    torch.testing.assert_close(_resample(image, -2, 40, mode), image, rtol=0, atol=0)
