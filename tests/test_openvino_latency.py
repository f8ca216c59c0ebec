"""``benchmarks/openvino_latency.py``'s compute bound: the FLOPs it counts in an IR, by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
ops = pytest.importorskip("openvino.opset13")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from openvino_latency import MATMUL_SIZE, compile_for_timing, graph_gflop, main, matmul_model  # noqa: E402


def _constant(*shape: int) -> object:
    return ops.constant(np.ones(shape, dtype=np.float32))


def test_graph_gflop_counts_matmul_convolutions_and_attention(tmp_path: Path) -> None:
    image = ops.parameter([1, 3, 16, 16], np.float32, name="input")
    # 3 -> 8 channels, 3x3, padding 1: 16x16x8 outputs, each 3*3*3 multiply-adds.
    conv = ops.convolution(image, _constant(8, 3, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1])
    # depth-wise 3x3 over the 8 channels: each output 1*3*3 multiply-adds.
    depthwise = ops.group_convolution(conv, _constant(8, 1, 1, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1])
    tokens = ops.reshape(depthwise, ops.constant(np.array([1, 8, 256], dtype=np.int64)), False)
    # (1, 8, 256) transposed -> (1, 256, 8) @ (8, 4)^T given as (4, 8): 256*4 outputs, 8 each.
    projected = ops.matmul(tokens, _constant(4, 8), True, True)
    heads = ops.reshape(projected, ops.constant(np.array([1, 2, 256, 2], dtype=np.int64)), False)
    # 2 heads, 256 queries x 256 keys, head dim 2: logits 2*256*256*2, values 2*256*256*2 multiply-adds.
    attention = ops.scaled_dot_product_attention(heads, heads, heads, causal=False)
    model = ov.Model([attention], [image], "counted")
    xml = tmp_path / "model.xml"
    ov.save_model(model, str(xml))

    expected = 2 * (
        16 * 16 * 8 * 27  # convolution
        + 16 * 16 * 8 * 9  # depth-wise convolution
        + 256 * 4 * 8  # matmul
        + 2 * 256 * 256 * 2 * 2  # attention: logits and weighted values
    )
    assert graph_gflop(xml) == pytest.approx(expected / 1e9, rel=1e-12)


def test_matmul_model_is_the_square_product_in_float32() -> None:
    """The compute bound's matmul, compiled as the benchmark compiles it: in f32. OpenVINO's CPU default is bf16
    where the CPU has it natively; its 8-bit inputs put these sums of 1024 products up to 0.36 off (median 0.05)."""
    model = compile_for_timing(matmul_model(), "CPU", threads=1)
    assert model.precision == "f32"
    left = np.random.default_rng(2).standard_normal((MATMUL_SIZE, MATMUL_SIZE)).astype(np.float32)
    weight = np.random.default_rng(0).standard_normal((MATMUL_SIZE, MATMUL_SIZE)).astype(np.float32)
    out = model.compiled({0: left})[0]
    np.testing.assert_allclose(out, left @ weight, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("item", ["no_separator", "=missing_name.xml", "name=does/not/exist.xml"])
def test_compare_xml_is_checked_before_any_training(item: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        main(["--compare-xml", item])
    assert error.value.code == 2
    assert "--compare-xml takes NAME=PATH" in capsys.readouterr().err


def test_compare_xml_may_not_take_a_name_the_script_uses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xml = tmp_path / "model.xml"
    xml.write_text("<net/>")
    with pytest.raises(SystemExit):
        main(["--compare-xml", f"FOD (Lite0)={xml}"])
    assert "--compare-xml names must differ" in capsys.readouterr().err
