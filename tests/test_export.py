"""Export of FOD to OpenVINO, ONNX and Torch, and parity of the exported models with Lightning.

A small FOD (64x64 input, narrow Transformers, one layer) is trained for one epoch on the bundled
battery_weld images, reloaded from its checkpoint with the network blocked and exported with
``Engine.export``. On all 128 battery_weld test images, pre-resized to the model's input size
(``OpenVINOInferencer`` does not resize outside the graph), the exported models must match
``Engine.predict``:

- ``pred_score`` within 1e-4 relative, identical ``pred_label``;
- anomaly maps within 1e-3 of the map's range (max abs difference).

The FP16-compressed OpenVINO model's drift is measured and printed (``pytest -s``); its labels
must be identical on the same images.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from PIL import Image

import anomalib_fod
from anomalib_fod import Fod
from anomalib_fod.models.fod.export import DynamicExportError
from fod_helpers import block_network

pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

DATA_ROOT = Path(anomalib_fod.__file__).parent / "data"
IMAGE_SIZE = (64, 64)
TINY = {"d_models": (32, 64), "num_heads": 2, "num_layers": 1, "ffn_ratio": 2}
SCORE_RTOL = 1e-4
MAP_TOL = 1e-3  # of the map's range
ONNX_OPSET = 18


# --------------------------------------------------------------------------- helpers


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@dataclass
class Exports:
    """Paths of the exported models and what was logged while exporting."""

    openvino: Path
    fp16: Path
    onnx: Path
    torch: Path
    model: Fod
    log_warnings: list[str] = field(default_factory=list)
    python_warnings: list[str] = field(default_factory=list)
    cli: subprocess.CompletedProcess | None = None


@dataclass
class Outputs:
    """Per-image outputs of one inference path, keyed by file name."""

    score: dict[str, float] = field(default_factory=dict)
    label: dict[str, bool] = field(default_factory=dict)
    anomaly_map: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, score: object, label: object, anomaly_map: object) -> None:
        self.score[name] = float(np.asarray(score, dtype=np.float64).reshape(-1)[0])
        self.label[name] = bool(np.asarray(label).reshape(-1)[0])
        self.anomaly_map[name] = np.asarray(anomaly_map, dtype=np.float64).reshape(IMAGE_SIZE)


def compare(reference: Outputs, other: Outputs) -> dict[str, float]:
    """Worst-case differences of ``other`` against ``reference``."""
    assert set(other.score) == set(reference.score)
    names = sorted(reference.score)
    score_abs = max(abs(other.score[n] - reference.score[n]) for n in names)
    score_rel = max(abs(other.score[n] - reference.score[n]) / max(abs(reference.score[n]), 1e-12) for n in names)
    map_rel = max(
        np.abs(other.anomaly_map[n] - reference.anomaly_map[n]).max() / map_range(reference.anomaly_map[n])
        for n in names
    )
    map_abs = max(np.abs(other.anomaly_map[n] - reference.anomaly_map[n]).max() for n in names)
    flips = sum(other.label[n] != reference.label[n] for n in names)
    return {
        "images": len(names),
        "score_max_abs": score_abs,
        "score_max_rel": score_rel,
        "map_max_abs": float(map_abs),
        "map_max_abs_over_range": float(map_rel),
        "label_flips": flips,
    }


def map_range(anomaly_map: np.ndarray) -> float:
    """Value range of one map; a flat map counts as range 1 (its values are in [0, 1])."""
    spread = float(anomaly_map.max() - anomaly_map.min())
    return spread if spread > 1e-6 else 1.0


def assert_parity(reference: Outputs, other: Outputs, what: str) -> None:
    names = sorted(reference.score)
    for name in names:
        np.testing.assert_allclose(
            other.score[name], reference.score[name], rtol=SCORE_RTOL, atol=1e-7, err_msg=f"{what} {name}"
        )
        diff = np.abs(other.anomaly_map[name] - reference.anomaly_map[name]).max()
        assert diff <= MAP_TOL * map_range(reference.anomaly_map[name]), f"{what} {name}: map diff {diff}"
    assert {n: other.label[n] for n in names} == {n: reference.label[n] for n in names}, what


SITE_CUSTOMIZE = textwrap.dedent(
    """
    import socket

    def _refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    socket.socket.connect = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
    """,
)


def run_cli_export(checkpoint: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """``anomalib-fod export --model anomalib_fod.Fod --export_type openvino`` without a network.

    A ``sitecustomize`` on ``PYTHONPATH`` makes every socket connection fail in the subprocess.
    """
    (folder / "site").mkdir(parents=True)
    (folder / "site" / "sitecustomize.py").write_text(SITE_CUSTOMIZE)
    script = Path(sys.executable).with_name("anomalib-fod")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "anomalib_fod.cli"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(folder / "site"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    arguments = ["--model", "anomalib_fod.Fod", "--export_type", "openvino", "--ckpt_path", str(checkpoint)]
    return subprocess.run(  # noqa: S603 - fixed arguments
        [*command, "export", *arguments, "--export_root", str(folder / "export"), *extra],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=folder,
        timeout=900,
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fod_export")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    """A tiny FOD trained for one epoch on battery_weld (validation fills the post-processor)."""
    seed_everything(0)
    model = Fod(**TINY, pre_processor=Fod.configure_pre_processor(IMAGE_SIZE), visualizer=False)
    engine = Engine(
        max_epochs=1,
        logger=False,
        default_root_dir=workdir / "train",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=MVTecAD(root=DATA_ROOT, category="battery_weld", num_workers=0))
    path = Path(engine.trainer.checkpoint_callback.best_model_path)
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def exports(checkpoint: Path, workdir: Path) -> Exports:
    """Reload the checkpoint and export it, with the network blocked throughout.

    ``Engine.export`` writes the FP32 OpenVINO, ONNX and Torch models in this process (default
    arguments for OpenVINO: the opset-18 default and the fixed size come from ``Fod``); the FP16
    OpenVINO model comes from ``anomalib-fod export ... --compression_type FP16`` in a subprocess.
    """
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "anomalib_fod")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block_network(patch)
            model = Fod.load_from_checkpoint(checkpoint)
            engine = Engine(logger=False, default_root_dir=workdir / "engine", enable_progress_bar=False)
            openvino = engine.export(model, ExportType.OPENVINO, export_root=workdir / "fp32")
            onnx = engine.export(
                model,
                ExportType.ONNX,
                export_root=workdir / "onnx",
                onnx_kwargs={"opset_version": ONNX_OPSET},
            )
            pt = engine.export(model, ExportType.TORCH, export_root=workdir / "torch")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    cli = run_cli_export(checkpoint, workdir / "cli", "--compression_type", "FP16")
    return Exports(
        openvino=openvino,
        fp16=workdir / "cli" / "export" / "weights" / "openvino" / "model.xml",
        onnx=onnx,
        torch=pt,
        model=model,
        log_warnings=handler.messages,
        python_warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
        cli=cli,
    )


@pytest.fixture(scope="module")
def images(workdir: Path) -> Path:
    """All battery_weld test images, resized (antialiased) to the model's input size, as RGB PNGs."""
    folder = workdir / "images"
    folder.mkdir()
    for source in sorted((DATA_ROOT / "battery_weld" / "test").glob("*/*.png")):
        with Image.open(source) as image:
            resized = image.convert("RGB").resize(IMAGE_SIZE[::-1], Image.Resampling.BILINEAR)
        resized.save(folder / f"{source.parent.name}_{source.name}")
    return folder


@pytest.fixture(scope="module")
def lightning_outputs(exports: Exports, images: Path, workdir: Path) -> Outputs:
    engine = Engine(logger=False, default_root_dir=workdir / "predict", enable_progress_bar=False)
    outputs = Outputs()
    for batch in engine.predict(exports.model, data_path=images, return_predictions=True):
        for i, path in enumerate(batch.image_path):
            outputs.add(Path(path).name, batch.pred_score[i], batch.pred_label[i], batch.anomaly_map[i])
    return outputs


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``OpenVINOInferencer`` creates ``./openvino_cache``: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def openvino_outputs(model_xml: Path, images: Path) -> Outputs:
    from anomalib.deploy import OpenVINOInferencer  # noqa: PLC0415

    inferencer = OpenVINOInferencer(path=model_xml, device="CPU")
    outputs = Outputs()
    for path in sorted(images.glob("*.png")):
        result = inferencer.predict(path)
        outputs.add(path.name, result.pred_score, result.pred_label, result.anomaly_map)
    return outputs


# --------------------------------------------------------------------------- fast tests (no training)


@pytest.fixture(scope="module")
def untrained() -> Fod:
    return Fod(**TINY, pre_trained=False, pre_processor=Fod.configure_pre_processor(IMAGE_SIZE))


@pytest.mark.parametrize(
    "onnx_kwargs",
    [
        {"dynamic_axes": {"input": {0: "batch", 2: "height", 3: "width"}}},
        {"dynamic_axes": {"input": {3: "width"}}},
        {"dynamic_shapes": ({0: torch.export.Dim("batch"), 2: torch.export.Dim("height")},)},
    ],
)
def test_dynamic_height_width_is_refused(untrained: Fod, tmp_path: Path, onnx_kwargs: dict) -> None:
    with pytest.raises(DynamicExportError, match="reference features"):
        untrained.to_onnx(tmp_path, **onnx_kwargs)
    with pytest.raises(DynamicExportError, match="fixed image size"):
        Engine(logger=False, default_root_dir=tmp_path).export(
            untrained,
            ExportType.OPENVINO,
            export_root=tmp_path,
            onnx_kwargs=onnx_kwargs,
        )


def test_export_without_fixed_size_pre_processing_needs_input_size(tmp_path: Path) -> None:
    model = Fod(**TINY, pre_trained=False, pre_processor=False)
    with pytest.raises(DynamicExportError, match="input_size"):
        model.to_onnx(tmp_path)


# --------------------------------------------------------------------------- slow tests


@pytest.mark.slow
def test_checkpoint_is_plain_data_and_reloads_offline(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)

    def assert_plain(value: object, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, str), where
                assert_plain(item, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                assert_plain(item, f"{where}[{i}]")
        else:
            assert value is None or type(value) in {str, int, float, bool}, f"{where}: {type(value)}"

    assert_plain(raw["hyper_parameters"], "hyper_parameters")
    block_network(monkeypatch)
    model = Fod.load_from_checkpoint(checkpoint)
    assert model.hparams.pre_trained is False
    assert model.model.has_reference
    state = model.state_dict()
    for key, value in raw["state_dict"].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_exported_files_and_clean_logs(exports: Exports) -> None:
    for path in (exports.openvino, exports.fp16):
        assert path.suffix == ".xml"
        assert path.with_suffix(".bin").stat().st_size > 0
    assert exports.onnx.suffix == ".onnx"
    assert exports.torch.suffix == ".pt"
    # FP16 compression halves the weights file.
    assert exports.fp16.with_suffix(".bin").stat().st_size < 0.6 * exports.openvino.with_suffix(".bin").stat().st_size
    conversion = [m for m in exports.log_warnings + exports.python_warnings if "version" in m.lower()]
    assert not conversion, conversion


@pytest.mark.slow
def test_onnx_graph_is_self_contained(exports: Exports) -> None:
    import onnx  # noqa: PLC0415

    graph = onnx.load(exports.onnx)
    opsets = {entry.domain: entry.version for entry in graph.opset_import}
    assert opsets[""] == ONNX_OPSET
    # One input: weights, reference features and thresholds are all constants of the graph.
    assert [tensor.name for tensor in graph.graph.input] == ["input"]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, *IMAGE_SIZE]
    assert dims[0].dim_param  # dynamic batch
    outputs = [tensor.name for tensor in graph.graph.output]
    assert outputs == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    ops = {node.op_type for node in graph.graph.node}
    assert {"Conv", "Softmax", "AveragePool", "Resize", "LayerNormalization"} <= ops


@pytest.mark.slow
def test_openvino_matches_lightning(exports: Exports, images: Path, lightning_outputs: Outputs, in_tmp_dir: Path) -> None:
    del in_tmp_dir
    ov_outputs = openvino_outputs(exports.openvino, images)
    print("\nOpenVINO FP32 vs Lightning:", json.dumps(compare(lightning_outputs, ov_outputs)))
    assert_parity(lightning_outputs, ov_outputs, "openvino")


@pytest.mark.slow
def test_openvino_fp16_drift(exports: Exports, images: Path, lightning_outputs: Outputs, in_tmp_dir: Path) -> None:
    del in_tmp_dir
    fp16_outputs = openvino_outputs(exports.fp16, images)
    drift = compare(lightning_outputs, fp16_outputs)
    print("\nOpenVINO FP16 vs Lightning:", json.dumps(drift))
    margin = min(abs(score - 0.5) for score in lightning_outputs.score.values())
    print(f"smallest distance of a normalised score to the 0.5 threshold: {margin:.4f}")
    # FP16 may flip a label only where the score itself moved across the threshold: an image whose
    # FP32 score lies closer to 0.5 than its FP16 drift (this test model has a score 2e-4 from it).
    for name, label in lightning_outputs.label.items():
        if fp16_outputs.label[name] != label:
            assert abs(lightning_outputs.score[name] - 0.5) <= abs(fp16_outputs.score[name] - lightning_outputs.score[name])
    # Sanity bounds only (scores and maps are normalised to [0, 1]). FP16 weights, mostly those of
    # the backbone, move the features; this 1-epoch test model measured score 0.09, map 0.08.
    assert drift["score_max_abs"] < 0.25
    assert drift["map_max_abs"] < 0.25


@pytest.mark.slow
def test_torch_inferencer_matches_lightning(
    exports: Exports,
    images: Path,
    lightning_outputs: Outputs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib.deploy import TorchInferencer  # noqa: PLC0415

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(path=exports.torch, device="cpu")
    outputs = Outputs()
    with torch.inference_mode():
        for path in sorted(images.glob("*.png")):
            result = inferencer.predict(path)
            outputs.add(path.name, result.pred_score, result.pred_label, result.anomaly_map)
    print("\nTorchInferencer vs Lightning:", json.dumps(compare(lightning_outputs, outputs)))
    assert_parity(lightning_outputs, outputs, "torch")


@pytest.mark.slow
def test_openvino_dynamic_batch(exports: Exports, images: Path, lightning_outputs: Outputs) -> None:
    import openvino as ov  # noqa: PLC0415

    from anomalib_fod.deploy import load_rgb  # noqa: PLC0415

    paths = sorted(images.glob("*.png"))[:4]
    batch = np.stack([load_rgb(p).transpose(2, 0, 1) for p in paths])
    result = ov.Core().compile_model(str(exports.openvino), "CPU")(batch)
    for i, path in enumerate(paths):
        np.testing.assert_allclose(result["pred_score"][i], lightning_outputs.score[path.name], rtol=SCORE_RTOL)


@pytest.mark.slow
def test_predict_folder_matches_lightning_on_original_images(
    exports: Exports,
    workdir: Path,
    tmp_path: Path,
) -> None:
    """predict-folder resizes outside the graph exactly like the training pipeline does."""
    import csv  # noqa: PLC0415

    from anomalib_fod.deploy import main  # noqa: PLC0415

    originals = tmp_path / "originals"
    originals.mkdir()
    for source in sorted((DATA_ROOT / "battery_weld" / "test").glob("*/*.png"))[::12]:
        (originals / f"{source.parent.name}_{source.name}").write_bytes(source.read_bytes())
    engine = Engine(logger=False, default_root_dir=workdir / "predict_originals", enable_progress_bar=False)
    expected = {}
    for batch in engine.predict(exports.model, data_path=originals, return_predictions=True):
        for i, path in enumerate(batch.image_path):
            expected[Path(path).name] = (float(batch.pred_score[i]), bool(batch.pred_label[i]))

    output = tmp_path / "out"
    assert main(["--model", str(exports.openvino), "--input", str(originals), "--output", str(output)]) == 0

    with (output / "predictions.csv").open(newline="") as file:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(file)}
    assert set(rows) == set(expected)
    for name, (score, label) in expected.items():
        assert float(rows[name]["pred_score"]) == pytest.approx(score, rel=1e-3, abs=2e-6), name
        assert int(rows[name]["pred_label"]) == int(label), name
        assert (output / "overlays" / name).is_file()


@pytest.mark.slow
def test_cli_export_offline(exports: Exports) -> None:
    """``anomalib-fod export`` with no input size and no opset, the network blocked."""
    result = exports.cli
    assert result is not None
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert exports.fp16.is_file()
    log = result.stdout + result.stderr
    assert "target version" not in log
    assert "version conversion" not in log
    assert "fixed input size 64x64" in log
