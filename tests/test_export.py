"""Export of FOD to OpenVINO, ONNX and Torch, and parity of the exported models with Lightning.

A small FOD (64x64 input, narrow Transformers, one layer) is trained for one epoch on the bundled
battery_weld images, reloaded from its checkpoint with the network blocked and exported with
``Engine.export``. The default export accepts images of any size and resizes them inside the graph
with the training filter, so on all 128 battery_weld test images *at their original 256x400* the
exported models must match ``Engine.predict`` on the same files (``export_parity.py``):

- ``pred_score`` within 1e-3 relative (measured: 6e-6), no label flipped (except where the score
  sits closer to the threshold than float rounding);
- anomaly maps within 1e-3 of the map's range (measured: 5e-5), returned at the training size.

The same holds for images pre-resized to the model size (resampled as an exact copy), for other
sizes (900x900, 100x700), for ONNX Runtime (when installed) and for ``TorchInferencer``. A graph
exported with a fixed ``input_size`` refuses other sizes with our own error. The FP16-compressed
and INT8-quantized OpenVINO models' drift is measured and printed (``pytest -s``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from export_parity import (
    SCORE_RTOL,
    Outputs,
    assert_parity,
    copy_images,
    engine_outputs,
    onnxruntime_outputs,
    openvino_outputs,
    parity,
    unexplained_flips,
)
from fod_helpers import block_network
from lightning.pytorch import seed_everything
from PIL import Image
from torchvision.transforms.v2 import Compose, Normalize

import anomalib_fod
from anomalib_fod import Cdo, Ed, Fod
from anomalib_fod.inference import ImageSizeError, OpenVINOInferencer
from anomalib_fod.models.export import DynamicExportError

pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

DATA_ROOT = Path(anomalib_fod.__file__).parent / "data"
TEST_IMAGES = sorted((DATA_ROOT / "battery_weld" / "test").glob("*/*.png"))  # 256x400 (height x width)
IMAGE_SIZE = (64, 64)
TINY = {"d_models": (32, 64), "num_heads": 2, "num_layers": 1, "ffn_ratio": 2}
ONNX_OPSET = 18


# --------------------------------------------------------------------------- helpers


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@dataclass
class Exports:
    """Paths of the exported models and what was logged while exporting."""

    openvino: Path
    fixed: Path
    fp16: Path
    onnx: Path
    torch: Path
    model: Fod
    log: list[str] = field(default_factory=list)
    python_warnings: list[str] = field(default_factory=list)
    cli: subprocess.CompletedProcess | None = None


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


def train_one_epoch(model: Fod | Cdo, root: Path) -> Path:
    """Fit ``model`` for one epoch on battery_weld (validation fills the post-processor); its checkpoint."""
    engine = Engine(
        max_epochs=1,
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=MVTecAD(root=DATA_ROOT, category="battery_weld", num_workers=0))
    path = Path(engine.trainer.checkpoint_callback.best_model_path)
    assert path.is_file()
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fod_export")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    """A tiny FOD trained for one epoch on battery_weld (validation fills the post-processor)."""
    seed_everything(0)
    model = Fod(**TINY, pre_processor=Fod.configure_pre_processor(IMAGE_SIZE), visualizer=False)
    return train_one_epoch(model, workdir / "train")


@pytest.fixture(scope="module")
def exports(checkpoint: Path, workdir: Path) -> Exports:
    """Reload the checkpoint and export it, with the network blocked throughout.

    ``Engine.export`` with default arguments writes the any-size OpenVINO, ONNX and Torch models in
    this process, and a fixed-size OpenVINO model (``input_size=(64, 64)``); the FP16 OpenVINO model
    comes from ``anomalib-fod export ... --compression_type FP16`` in a subprocess.
    """
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "anomalib_fod")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block_network(patch)
            model = Fod.load_from_checkpoint(checkpoint)
            engine = Engine(logger=False, default_root_dir=workdir / "engine", enable_progress_bar=False)
            openvino = engine.export(model, ExportType.OPENVINO, export_root=workdir / "fp32")
            fixed = engine.export(model, ExportType.OPENVINO, export_root=workdir / "fixed", input_size=IMAGE_SIZE)
            onnx = engine.export(model, ExportType.ONNX, export_root=workdir / "onnx")
            pt = engine.export(model, ExportType.TORCH, export_root=workdir / "torch")
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    cli = run_cli_export(checkpoint, workdir / "cli", "--compression_type", "FP16")
    return Exports(
        openvino=openvino,
        fixed=fixed,
        fp16=workdir / "cli" / "export" / "weights" / "openvino" / "model.xml",
        onnx=onnx,
        torch=pt,
        model=model,
        log=handler.messages,
        python_warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
        cli=cli,
    )


@pytest.fixture(scope="module")
def originals(workdir: Path) -> Path:
    """All battery_weld test images as they are (256x400 RGB PNGs)."""
    return copy_images(TEST_IMAGES, workdir / "originals")


@pytest.fixture(scope="module")
def resized(workdir: Path) -> Path:
    """All battery_weld test images pre-resized to the model size (the graph's resize is then a copy)."""
    folder = workdir / "resized"
    folder.mkdir()
    for source in TEST_IMAGES:
        with Image.open(source) as image:
            image.convert("RGB").resize(IMAGE_SIZE[::-1], Image.Resampling.BILINEAR).save(
                folder / f"{source.parent.name}_{source.name}",
            )
    return folder


@pytest.fixture(scope="module")
def reference(exports: Exports, originals: Path, workdir: Path) -> Outputs:
    """``Engine.predict`` on the original images."""
    engine = Engine(logger=False, default_root_dir=workdir / "predict", enable_progress_bar=False)
    return engine_outputs(engine, exports.model, originals)


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``OpenVINOInferencer`` creates ``./openvino_cache``: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- fast tests (no training)


def test_dynamic_height_width_without_a_fixed_resize_is_refused(tmp_path: Path) -> None:
    """No resize in the pre-processor: a dynamic size would break FOD's reference grid."""
    normalise_only = PreProcessor(transform=Compose([Normalize(mean=[0.5] * 3, std=[0.5] * 3)]))
    model = Fod(**TINY, pre_trained=False, pre_processor=normalise_only)
    for onnx_kwargs in (
        {"dynamic_axes": {"input": {0: "batch", 2: "height", 3: "width"}}},
        {"dynamic_shapes": ({0: torch.export.Dim("batch"), 2: torch.export.Dim("height")},)},
    ):
        with pytest.raises(DynamicExportError, match="reference features"):
            model.to_onnx(tmp_path, input_size=IMAGE_SIZE, **onnx_kwargs)
        with pytest.raises(DynamicExportError, match="does not resize"):
            Engine(logger=False, default_root_dir=tmp_path).export(
                model,
                ExportType.OPENVINO,
                export_root=tmp_path,
                input_size=IMAGE_SIZE,
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
    for path in (exports.openvino, exports.fixed, exports.fp16):
        assert path.suffix == ".xml"
        assert path.with_suffix(".bin").stat().st_size > 0
    assert exports.onnx.suffix == ".onnx"
    assert exports.torch.suffix == ".pt"
    # FP16 compression halves the weights file.
    assert exports.fp16.with_suffix(".bin").stat().st_size < 0.6 * exports.openvino.with_suffix(".bin").stat().st_size
    conversion = [m for m in exports.log + exports.python_warnings if "version" in m.lower() and "WARNING" in m]
    assert not conversion, conversion
    assert any("any size" in m and "64x64" in m for m in exports.log), exports.log
    assert any("fixed input size 64x64" in m for m in exports.log), exports.log


@pytest.mark.slow
def test_onnx_graph_accepts_any_size(exports: Exports) -> None:
    import onnx  # noqa: PLC0415

    graph = onnx.load(exports.onnx)
    opsets = {entry.domain: entry.version for entry in graph.opset_import}
    assert opsets[""] == ONNX_OPSET
    # One input: weights, reference features and thresholds are all constants of the graph.
    assert [tensor.name for tensor in graph.graph.input] == ["input"]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3  # noqa: PLR2004
    assert all(d.dim_param and not d.dim_value for d in (dims[0], dims[2], dims[3]))  # batch, height, width
    outputs = [tensor.name for tensor in graph.graph.output]
    assert outputs == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    ops = {node.op_type for node in graph.graph.node}
    assert {"Conv", "Softmax", "AveragePool", "LayerNormalization"} <= ops
    # No branch on the input size (resize.py says why) and no ONNX Resize with antialias (OpenVINO ignores it).
    assert "If" not in ops
    assert not [n for n in graph.graph.node if n.op_type == "Resize" and any(a.name == "antialias" and a.i for a in n.attribute)]


@pytest.mark.slow
@pytest.mark.parametrize("stock", [False, True], ids=["ours", "anomalibs_with_the_f32_hint"])
def test_openvino_matches_lightning_on_original_images(
    exports: Exports,
    originals: Path,
    reference: Outputs,
    in_tmp_dir: Path,
    stock: bool,
) -> None:
    """The plugin's inferencer, and anomalib's own with the one line docs/deploy.md gives its users."""
    del in_tmp_dir
    config = {"INFERENCE_PRECISION_HINT": "f32"} if stock else None
    outputs = openvino_outputs(exports.openvino, originals, config=config, stock=stock)
    what = "anomalib's OpenVINOInferencer, f32 hint" if stock else "OpenVINO FP32"
    print(f"\n{what} vs Engine.predict, 256x400 originals:", json.dumps(assert_parity(reference, outputs, what)))
    assert {m.shape for m in outputs.anomaly_map.values()} == {IMAGE_SIZE}  # the training size


@pytest.mark.slow
def test_openvino_compiles_in_float32_on_every_cpu(exports: Exports, in_tmp_dir: Path) -> None:
    """The plugin's inferencer, read back from the compiled model: no convolution or matmul of FOD runs in bf16,
    whatever the CPU's own default is."""
    del in_tmp_dir
    inferencer = OpenVINOInferencer(path=exports.openvino, device="CPU")
    assert inferencer.precision == "f32"
    runtime = inferencer.model.get_runtime_model().get_ordered_ops()
    assert not {node.get_rt_info()["runtimePrecision"].astype(str) for node in runtime} & {"bf16", "f16"}


@pytest.mark.slow
def test_anomalibs_inferencer_defaults_on_a_bf16_cpu(exports: Exports, originals: Path, reference: Outputs, in_tmp_dir: Path) -> None:
    """Where the CPU has native bf16, anomalib's inferencer with its defaults computes in bf16: scores move beyond
    the parity bounds (what the plugin's paths avoid), while the ranking holds (benchmarks/results/precision.md)."""
    del in_tmp_dir
    import openvino as ov  # noqa: PLC0415

    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    if default != "bf16":
        pytest.skip(f"this CPU's OpenVINO default precision is {default}, not bf16 (no native bf16)")
    drift = parity(reference, openvino_outputs(exports.openvino, originals, stock=True))
    print("\nanomalib's OpenVINOInferencer defaults (bf16) vs Engine.predict:", json.dumps(drift))
    assert drift["score_max_rel"] > SCORE_RTOL  # bf16 is visible: the f32 paths' parity is no accident


@pytest.mark.slow
def test_onnxruntime_matches_lightning_on_original_images(exports: Exports, originals: Path, reference: Outputs) -> None:
    pytest.importorskip("onnxruntime")
    outputs = onnxruntime_outputs(exports.onnx, originals)
    print("\nONNX Runtime vs Engine.predict, 256x400 originals:", json.dumps(assert_parity(reference, outputs, "onnxruntime")))


@pytest.mark.slow
def test_openvino_matches_lightning_on_pre_resized_images(
    exports: Exports,
    resized: Path,
    workdir: Path,
    in_tmp_dir: Path,
) -> None:
    del in_tmp_dir
    engine = Engine(logger=False, default_root_dir=workdir / "predict_resized", enable_progress_bar=False)
    expected = engine_outputs(engine, exports.model, resized)
    for xml in (exports.openvino, exports.fixed):
        result = assert_parity(expected, openvino_outputs(xml, resized), str(xml))
        print(f"\n{xml.parent.parent.parent.name} OpenVINO vs Engine.predict, 64x64 images:", json.dumps(result))


@pytest.mark.slow
def test_openvino_matches_lightning_at_other_sizes(exports: Exports, workdir: Path, in_tmp_dir: Path) -> None:
    """Real images scaled to 900x900 (shrunk 14x inside the graph) and to 100x700."""
    del in_tmp_dir
    engine = Engine(logger=False, default_root_dir=workdir / "predict_sizes", enable_progress_bar=False)
    for height, width in ((900, 900), (100, 700)):
        folder = workdir / f"size_{height}x{width}"
        folder.mkdir()
        for source in TEST_IMAGES[::16]:
            with Image.open(source) as image:
                image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(folder / source.name)
        expected = engine_outputs(engine, exports.model, folder)
        result = assert_parity(expected, openvino_outputs(exports.openvino, folder), f"{height}x{width}")
        print(f"\nOpenVINO vs Engine.predict at {height}x{width}:", json.dumps(result))


@pytest.mark.slow
def test_fixed_size_graph_refuses_other_sizes_with_our_error(exports: Exports, originals: Path, in_tmp_dir: Path) -> None:
    del in_tmp_dir
    import openvino as ov  # noqa: PLC0415

    assert ov.Core().read_model(exports.fixed).input(0).get_partial_shape() == ov.PartialShape([-1, 3, *IMAGE_SIZE])
    inferencer = OpenVINOInferencer(path=exports.fixed, device="CPU")
    assert inferencer.input_size == IMAGE_SIZE
    with pytest.raises(ImageSizeError, match=r"fixed input size of 64x64.*image is 256x400.*without input_size"):
        inferencer.predict(next(originals.iterdir()))
    assert OpenVINOInferencer(path=exports.openvino, device="CPU").input_size is None


@pytest.mark.slow
def test_openvino_fp16_drift(exports: Exports, originals: Path, reference: Outputs, in_tmp_dir: Path) -> None:
    del in_tmp_dir
    fp16_outputs = openvino_outputs(exports.fp16, originals)
    drift = parity(reference, fp16_outputs)
    print("\nOpenVINO FP16 vs Engine.predict:", json.dumps(drift))
    margin = min(abs(score - 0.5) for score in reference.score.values())
    print(f"smallest distance of a normalised score to the 0.5 threshold: {margin:.4f}")
    # FP16 may flip a label only where the score itself moved across the threshold.
    assert not unexplained_flips(reference, fp16_outputs)
    # Sanity bounds only (scores and maps are normalised to [0, 1]). FP16 weights, mostly those of
    # the backbone, move the features; this 1-epoch test model measured score 0.09, map 0.08.
    assert drift["score_max_abs"] < 0.25  # noqa: PLR2004
    assert drift["map_max_abs"] < 0.25  # noqa: PLR2004


@pytest.mark.slow
def test_torch_inferencer_matches_lightning_on_original_images(
    exports: Exports,
    originals: Path,
    reference: Outputs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``TorchInferencer`` runs ``Fod.forward``, which resizes as training did (anomalib's would not)."""
    from anomalib.deploy import TorchInferencer  # noqa: PLC0415

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(path=exports.torch, device="cpu")
    outputs = Outputs()
    with torch.inference_mode():
        for path in sorted(originals.iterdir()):
            result = inferencer.predict(path)
            outputs.add(path.name, result.pred_score, result.pred_label, result.anomaly_map)
    print("\nTorchInferencer vs Engine.predict:", json.dumps(assert_parity(reference, outputs, "torch")))


@pytest.mark.slow
def test_openvino_dynamic_batch(exports: Exports, originals: Path, reference: Outputs) -> None:
    from anomalib_fod.deploy import load_rgb  # noqa: PLC0415
    from anomalib_fod.inference import OpenVINOModel  # noqa: PLC0415

    paths = sorted(originals.iterdir())[:4]
    batch = np.stack([load_rgb(p).transpose(2, 0, 1) for p in paths])
    result = OpenVINOModel(exports.openvino, "CPU")(batch)
    for i, path in enumerate(paths):
        np.testing.assert_allclose(result["pred_score"][i], reference.score[path.name], rtol=1e-3)


@pytest.mark.slow
def test_int8_ptq_quantizes_the_backbone_only(
    exports: Exports,
    workdir: Path,
    originals: Path,
    reference: Outputs,
    in_tmp_dir: Path,
) -> None:
    """INT8_PTQ: backbone convolutions in 8 bits, the scoring head (its blur included) in float32.

    Quantizing the head (the map's Gaussian blur is a convolution) sent every score to 0.0 (image
    AUROC 0.5). The accuracy of INT8 against FP32 is measured on trained models in
    ``benchmarks/export_check.py``; this 1-epoch 64 px model only shows that scores still rank.
    """
    del in_tmp_dir
    pytest.importorskip("nncf")
    import openvino as ov  # noqa: PLC0415
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    from anomalib_fod.models.quantization import _weight_name  # noqa: PLC0415

    datamodule = MVTecAD(root=DATA_ROOT, category="battery_weld", num_workers=0, eval_batch_size=16)
    engine = Engine(logger=False, default_root_dir=workdir / "int8", enable_progress_bar=False)
    xml = engine.export(
        exports.model,
        ExportType.OPENVINO,
        export_root=workdir / "int8",
        compression_type=CompressionType.INT8_PTQ,
        datamodule=datamodule,
    )
    ops = ov.Core().read_model(xml).get_ordered_ops()
    quantized = [
        consumer.get_node()
        for op in ops
        if op.get_type_name() == "FakeQuantize"
        for consumer in op.output(0).get_target_inputs()
    ]
    assert {node.get_type_name() for node in quantized} == {"Convolution", "GroupConvolution"}
    blur = [op for op in ops if op.get_type_name() == "Convolution" and _weight_name(op).startswith("model.anomaly_map_generator.")]
    assert blur, "the head's blur should still be a float convolution with its own weights"
    assert not {node.get_friendly_name() for node in quantized} & {op.get_friendly_name() for op in blur}

    int8 = openvino_outputs(xml, originals)
    names = sorted(reference.score)
    labels = [not name.startswith("good_") for name in names]
    auroc = {
        "fp32": roc_auc_score(labels, [reference.score[n] for n in names]),
        "int8": roc_auc_score(labels, [int8.score[n] for n in names]),
    }
    print(f"\nOpenVINO INT8_PTQ vs Engine.predict: {json.dumps(parity(reference, int8))}, image AUROC {auroc}")
    assert np.std([int8.score[n] for n in names]) > 0.1 * np.std([reference.score[n] for n in names])
    # Scores still rank (a quantized head sent them all to 0: AUROC 0.5). INT8_PTQ on the default lost up to 0.134
    # image AUROC on trained models (docs/deploy.md); on this 1-epoch model the loss follows the nearest-token draw
    # (-0.045 and -0.129 from two draws), so the bound is that measured range, not a finer one.
    assert auroc["int8"] >= auroc["fp32"] - 0.15  # noqa: PLR2004


@pytest.mark.slow
def test_predict_folder_matches_lightning_on_original_images(
    exports: Exports,
    originals: Path,
    reference: Outputs,
    tmp_path: Path,
) -> None:
    """predict-folder passes each image at its own size to the any-size graph."""
    import csv  # noqa: PLC0415

    from anomalib_fod.deploy import main  # noqa: PLC0415

    folder = tmp_path / "some"
    folder.mkdir()
    for path in sorted(originals.iterdir())[::12]:
        (folder / path.name).write_bytes(path.read_bytes())
    output = tmp_path / "out"
    assert main(["--model", str(exports.openvino), "--input", str(folder), "--output", str(output)]) == 0

    with (output / "predictions.csv").open(newline="") as file:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(file)}
    assert set(rows) == {path.name for path in folder.iterdir()}
    for name, row in rows.items():
        score = float(row["pred_score"])
        assert score == pytest.approx(reference.score[name], rel=1e-3), name
        if int(row["pred_label"]) != int(reference.label[name]):  # only on the threshold, within rounding
            assert abs(reference.score[name] - 0.5) <= abs(score - reference.score[name]) + 1e-6, name
        with Image.open(folder / name) as image, Image.open(output / "overlays" / name) as overlay:
            assert overlay.size == image.size


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
    assert "graph for images of any size" in log


# --------------------------------------------------------------------------- CDO, ED and FOD's whitened residual


def _other_model(name: str) -> Fod | Cdo:
    common = {"image_size": IMAGE_SIZE, "visualizer": False}
    if name == "cdo":
        return Cdo(**common)
    if name == "ed":
        return Ed(**TINY, **common)
    # statistics are buffers: graph constants
    covariance = "blend" if name == "fod_blend" else "shared"
    return Fod(**TINY, reconstruction_term="mahalanobis", residual_covariance=covariance, **common)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cdo", "ed", "fod_mahalanobis", "fod_blend"])
def test_other_models_match_lightning_at_any_size(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 epoch at 64 px on battery_weld, reloaded and exported with defaults; every 8th test image at its
    original 256x400 and two scaled to 900x900, through OpenVINOInferencer and ONNX Runtime."""
    seed_everything(0)
    model = _other_model(name)
    model = type(model).load_from_checkpoint(train_one_epoch(model, tmp_path / "train"))
    engine = Engine(logger=False, default_root_dir=tmp_path / "engine", enable_progress_bar=False)
    xml = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "openvino")
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "onnx")

    folder = copy_images(TEST_IMAGES[::8], tmp_path / "images")
    for source in TEST_IMAGES[1::64]:
        with Image.open(source) as image:
            image.convert("RGB").resize((900, 900), Image.Resampling.LANCZOS).save(folder / f"900_{source.name}")
    expected = engine_outputs(engine, model, folder)
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes ./openvino_cache
    result = {"openvino": assert_parity(expected, openvino_outputs(xml, folder), f"{name} openvino")}
    if name.startswith("fod_"):
        import onnx  # noqa: PLC0415
        from onnx import numpy_helper  # noqa: PLC0415

        # Each level's fitted statistics are constants of the graph (the scores depend on them).
        initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(onnx_path).graph.initializer}
        for level, statistics in enumerate(model.model.anomaly_map_generator.statistics):
            assert statistics.fitted
            buffers = ["mean", "precision"] + (["position_precision"] if statistics.per_position else [])
            for buffer in buffers:
                key = f"model.anomaly_map_generator.statistics.{level}.{buffer}"
                np.testing.assert_array_equal(initializers[key], getattr(statistics, buffer).numpy(), err_msg=key)
    try:
        result["onnxruntime"] = assert_parity(expected, onnxruntime_outputs(onnx_path, folder), f"{name} onnxruntime")
    except ImportError:
        result["onnxruntime"] = "not installed"
    print(f"\n{name} vs Engine.predict, 256x400 and 900x900 images:", json.dumps(result))
