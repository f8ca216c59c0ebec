"""``anomalib-fod predict-folder`` on a folder of mixed image files.

A tiny synthetic OpenVINO model stands in for an exported FOD model (same input/output names,
fixed 24x32 input): ``anomaly_map`` is the channel mean of the input image, ``pred_score`` its
maximum and ``pred_label`` ``score > 0.5``, so the expected outputs of every file are known.
Variants: any input size (as the plugin exports by default), and a fixed input whose map is
smaller than the input (a fixed graph not at the training size, which cannot take other sizes).
The end-to-end run with a real exported FOD model is in ``test_export.py``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_fod import cli
from anomalib_fod.deploy import CSV_NAME, OVERLAY_DIR, load_rgb, main

ov = pytest.importorskip("openvino")

MODEL_SIZE = (24, 32)


def synthetic_model(
    path: Path,
    height: int | None = MODEL_SIZE[0],
    width: int | None = MODEL_SIZE[1],
    map_stride: int = 1,
) -> Path:
    """Save an OpenVINO model with anomalib's output names; ``None`` makes an axis dynamic.

    ``map_stride`` > 1 average-pools the map, so that it is smaller than the input.
    """
    import openvino.opset13 as ops  # noqa: PLC0415

    shape = ov.PartialShape([-1, 3, height or -1, width or -1])
    image = ops.parameter(shape, ov.Type.f32, name="input")
    anomaly_map = ops.reduce_mean(image, ops.constant(np.array([1], dtype=np.int64)), keep_dims=True)
    if map_stride > 1:
        stride = [map_stride, map_stride]
        anomaly_map = ops.avg_pool(anomaly_map, stride, [0, 0], [0, 0], stride, exclude_pad=True)
    score = ops.reduce_max(anomaly_map, ops.constant(np.array([1, 2, 3], dtype=np.int64)), keep_dims=False)
    label = ops.greater(score, ops.constant(np.float32(0.5)))
    for node, name in ((score, "pred_score"), (label, "pred_label"), (anomaly_map, "anomaly_map")):
        node.output(0).get_tensor().set_names({name})
    model = ov.Model([score.output(0), label.output(0), anomaly_map.output(0)], [image], "synthetic")
    ov.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def model_xml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_model(tmp_path_factory.mktemp("model") / "model.xml")


def make_folder(root: Path) -> dict[str, float]:
    """Write one file of each kind; return the expected pred_score of the readable ones."""
    (root / "sub" / "deeper").mkdir(parents=True)
    expected = {}

    Image.fromarray(np.full((40, 50), 51, dtype=np.uint8), mode="L").save(root / "grey.png")
    expected["grey.png"] = 51 / 255

    rgba = np.zeros((30, 70, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, half transparent: alpha is dropped as in anomalib's reader
    rgba[..., 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(root / "sub" / "rgba.png")
    expected["sub/rgba.png"] = 1 / 3

    # 16 bit: 0.8 of full scale. Clipping to 8 bit (Pillow's RGB conversion) would give 1.0.
    sixteen = Image.fromarray(np.full((33, 21), int(0.8 * 65535), dtype=np.uint16))
    sixteen.save(root / "sub" / "deeper" / "sixteen.png")
    expected["sub/deeper/sixteen.png"] = 0.8

    palette = Image.new("P", (64, 48))
    palette.putpalette([0, 0, 0, 255, 255, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.paste(2, (0, 0, 64, 48))  # every pixel green
    palette.save(root / "palette.png", transparency=0)
    expected["palette.png"] = 1 / 3

    Image.fromarray(np.full((100, 80, 3), 200, dtype=np.uint8)).save(root / "photo.JPG", quality=95)
    expected["photo.JPG"] = 200 / 255

    # Truncated: the first half of a valid PNG.
    buffer = root / "full.tmp"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.read_bytes()
    buffer.unlink()
    (root / "sub" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image, ignored")
    return expected


def read_csv(path: Path) -> dict[str, tuple[float, int]]:
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    return {row["path"]: (float(row["pred_score"]), int(row["pred_label"])) for row in rows}


def test_mixed_folder(model_xml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    expected = make_folder(images)
    output = tmp_path / "out"

    status = main(["--model", str(model_xml), "--input", str(images), "--output", str(output)])

    assert status == 0
    err = capsys.readouterr().err
    assert f"{model_xml} compiled for CPU in f32" in err  # the precision read back from the compiled model
    assert "truncated.png" in err
    assert "5 image(s) processed, 1 skipped" in err
    rows = read_csv(output / CSV_NAME)
    assert set(rows) == {str(images / name) for name in expected}
    for name, score in expected.items():
        got, label = rows[str(images / name)]
        tolerance = 0.02 if name.endswith(".JPG") else 1e-3  # JPEG is lossy
        assert got == pytest.approx(score, abs=tolerance), name
        assert label == int(got > 0.5)
    for name in expected:
        overlay = output / OVERLAY_DIR / Path(name).with_suffix(".png")
        with Image.open(images / name) as original, Image.open(overlay) as result:
            assert result.size == original.size
            assert result.mode == "RGB"
    assert not (output / OVERLAY_DIR / "sub" / "truncated.png").exists()


def test_all_corrupt_is_an_error(model_xml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "b.jpg").write_bytes(b"")

    status = main(["--model", str(model_xml), "--input", str(images), "--output", str(tmp_path / "out")])

    assert status != 0
    err = capsys.readouterr().err
    assert "a.png" in err
    assert "b.jpg" in err


def test_precision_is_chosen_and_reported(model_xml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--precision device`` compiles what the CPU chooses by itself; one it lacks is refused before any image."""
    images = tmp_path / "images"
    make_folder(images)
    status = main(["--model", str(model_xml), "--input", str(images), "--output", str(tmp_path / "a"), "--precision", "device"])
    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    assert status == 0
    assert f"compiled for CPU in {default}" in capsys.readouterr().err
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    lacking = [precision for precision, flag in (("f16", "FP16"), ("bf16", "BF16")) if flag not in capabilities]
    if not lacking:
        pytest.skip("this CPU computes in both bf16 and f16 natively")
    output = tmp_path / "b"
    status = main(["--model", str(model_xml), "--input", str(images), "--output", str(output), "--precision", lacking[0]])
    assert status == 2  # noqa: PLR2004
    assert f"does not compute in {lacking[0]} natively" in capsys.readouterr().err
    assert not output.exists()


def test_no_images_is_an_error(model_xml: Path, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    assert main(["--model", str(model_xml), "--input", str(tmp_path / "images"), "--output", str(tmp_path)]) != 0


def test_any_size_model_gets_each_image_at_its_own_size(tmp_path: Path) -> None:
    """A graph with dynamic height/width resizes inside: predict-folder must not resize before it."""
    model = synthetic_model(tmp_path / "dynamic.xml", height=None, width=None)
    images = tmp_path / "images"
    images.mkdir()
    spot = np.zeros((40, 50), dtype=np.uint8)
    spot[17, 23] = 255  # one bright pixel: any resize would dilute the maximum
    Image.fromarray(spot, mode="L").save(images / "spot.png")
    output = tmp_path / "out"

    assert main(["--model", str(model), "--input", str(images), "--output", str(output)]) == 0

    assert read_csv(output / CSV_NAME)[str(images / "spot.png")] == (pytest.approx(1.0), 1)
    with Image.open(output / OVERLAY_DIR / "spot.png") as overlay:
        assert overlay.size == (50, 40)


def test_fixed_graph_not_at_training_size_refuses_other_sizes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Input 24x32, map 12x16: resizing other images to 24x32 would not be what training did."""
    model = synthetic_model(tmp_path / "fixed.xml", map_stride=2)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", MODEL_SIZE[::-1], 100).save(images / "right.png")
    Image.new("L", (50, 40), 100).save(images / "wrong.png")

    status = main(["--model", str(model), "--input", str(images), "--output", str(tmp_path / "out")])

    assert status == 0
    err = capsys.readouterr().err
    assert "1 image(s) processed, 1 skipped" in err
    assert "wrong.png" in err
    assert "24x32" in err and "40x50" in err  # both sizes, height x width
    assert "without input_size" in err  # and what to do
    assert list(read_csv(tmp_path / "out" / CSV_NAME)) == [str(images / "right.png")]


def test_output_inside_input_is_not_reprocessed(model_xml: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (10, 10), (10, 20, 30)).save(images / "x.png")
    args = ["--model", str(model_xml), "--input", str(images), "--output", str(images / "out"), "--no_progress", "true"]
    assert main(args) == 0
    assert main(args) == 0  # second run must not pick up the overlays of the first
    assert list(read_csv(images / "out" / CSV_NAME)) == [str(images / "x.png")]


def test_same_stem_different_extension(model_xml: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (10, 10)).save(images / "x.png")
    Image.new("RGB", (10, 10)).save(images / "x.jpg")
    assert main(["--model", str(model_xml), "--input", str(images), "--output", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o" / OVERLAY_DIR).iterdir()) == ["x_jpg.png", "x_png.png"]


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("L", np.full((5, 7), 255, dtype=np.uint8)),
        ("RGB", np.full((5, 7, 3), 255, dtype=np.uint8)),
        ("RGBA", np.full((5, 7, 4), 255, dtype=np.uint8)),
        ("I;16", np.full((5, 7), 65535, dtype=np.uint16)),
    ],
)
def test_load_rgb_modes(tmp_path: Path, mode: str, array: np.ndarray) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as saved:
        assert saved.mode == mode
    image = load_rgb(path)
    assert image.shape == (5, 7, 3)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, 1.0)


def test_cli_dispatch_in_process(model_xml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (10, 10)).save(images / "x.png")
    argv = ["anomalib-fod", "predict-folder", "--model", str(model_xml), "--input", str(images)]
    monkeypatch.setattr(sys, "argv", [*argv, "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    assert (tmp_path / "out" / CSV_NAME).is_file()


def test_console_script(model_xml: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (10, 10)).save(images / "x.png")
    script = Path(sys.executable).with_name("anomalib-fod")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "anomalib_fod.cli"]
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [*command, "predict-folder", "--model", str(model_xml), "--input", str(images), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "predict-folder" in result.stderr  # the tqdm bar and the summary go to stderr
    assert (tmp_path / "o" / CSV_NAME).is_file()
