"""Exported FOD/ED/CDO on real images at their own size: parity, INT8 accuracy and OpenVINO latency.

For one model and one MVTec-layout category, from a checkpoint (``--ckpt``) or a short training run:

1. ``Engine.export`` to OpenVINO (FP32, any image size: the default), to ONNX, and to OpenVINO with
   a fixed input at the training size (``input_size``, anomalib's static shape); with ``--int8`` also
   ``INT8_PTQ`` and ``INT8_ACQ`` (calibrated on the datamodule's validation images).
2. Parity with ``Engine.predict`` on every test image *at its original size*, for anomalib's
   ``OpenVINOInferencer.predict(path)`` and for ONNX Runtime (when installed): max relative score
   difference, max map difference over the map's range, label flips.
3. Exact image AUROC (``anomalib_fod.evaluation``, on the OpenVINO models' normalised scores) of FP32 and each
   INT8 model.
4. Batch-1 OpenVINO CPU latency, all graphs timed alternately (A, B, C, A, B, C, ...) so that a
   shared machine's load affects them alike: the fixed graph on a training-size image, the any-size
   graph on the same image (its no-resize branch), on an original test image and on a 900x900 image;
   the INT8 graphs on the training-size image; and torchvision's antialiased resize of the original
   and 900x900 images outside the graph (what ``predict-folder`` could do instead).

Usage (from the repository root; one thread, as the machine is shared):
    OMP_NUM_THREADS=1 python benchmarks/export_check.py --model cdo --category battery_weld --epochs 20 --int8
    OMP_NUM_THREADS=1 python benchmarks/export_check.py --model fod --root <datasets>/mvtec_ad \\
        --category bottle --ckpt X.ckpt --int8 --json out.json

Prints one JSON object (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # export_parity.py: the helpers the export tests use


def build_model(name: str, image_size: int) -> Any:  # noqa: ANN401
    from anomalib_fod import Cdo, Ed, Fod

    cls = {"fod": Fod, "ed": Ed, "cdo": Cdo}[name]
    return cls(image_size=(image_size, image_size), visualizer=False)


def model_class(name: str) -> Any:  # noqa: ANN401
    from anomalib_fod import Cdo, Ed, Fod

    return {"fod": Fod, "ed": Ed, "cdo": Cdo}[name]


def datamodule(root: Path, category: str, batch_size: int) -> Any:  # noqa: ANN401
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=0,
    )


def train(args: argparse.Namespace, workdir: Path) -> tuple[Path, float]:
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(args.seed)
    model = build_model(args.model, args.image_size)
    engine = Engine(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        logger=False,
        default_root_dir=workdir / "train",
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule(args.root, args.category, args.batch_size))
    return Path(engine.trainer.checkpoint_callback.best_model_path), time.perf_counter() - start


def export_all(model: Any, args: argparse.Namespace, workdir: Path) -> dict[str, Path]:  # noqa: ANN401
    from anomalib.deploy import CompressionType, ExportType
    from anomalib.engine import Engine

    engine = Engine(logger=False, default_root_dir=workdir / "engine", enable_progress_bar=False)
    size = (args.image_size, args.image_size)
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, **kwargs: Any) -> None:  # noqa: ANN401
        start = time.perf_counter()
        paths[name] = engine.export(model, export_root=workdir / name, **kwargs)
        seconds[name] = round(time.perf_counter() - start, 1)

    timed("any_size", export_type=ExportType.OPENVINO)
    timed("fixed", export_type=ExportType.OPENVINO, input_size=size)
    timed("onnx", export_type=ExportType.ONNX)
    if args.int8:
        calibration = datamodule(args.root, args.category, args.batch_size)
        timed("int8_ptq", export_type=ExportType.OPENVINO, compression_type=CompressionType.INT8_PTQ, datamodule=calibration)
    if args.int8 and not args.skip_acq:
        timed(
            "int8_acq",
            export_type=ExportType.OPENVINO,
            compression_type=CompressionType.INT8_ACQ,
            datamodule=datamodule(args.root, args.category, args.batch_size),
            max_drop=args.max_drop,
        )
    print(f"[export_check] export seconds: {json.dumps(seconds)}", flush=True)
    return paths


def image_auroc(outputs: Any) -> float:  # noqa: ANN401
    from anomalib_fod.evaluation import image_auroc as exact_image_auroc

    names = sorted(outputs.score)
    labels = np.array([not name.startswith("good_") for name in names], dtype=np.int64)
    return exact_image_auroc(np.array([outputs.score[n] for n in names]), labels)


def load_batch(path: Path) -> np.ndarray:
    from anomalib.data.utils import read_image

    return read_image(path, as_tensor=False).astype(np.float32).transpose(2, 0, 1)[None].copy()


def time_alternately(calls: dict[str, Any], runs: int, warmup: int, digits: int = 3) -> dict[str, dict[str, float]]:
    """Median and p10/p90 ms of each of ``calls`` (no-argument functions), timed alternately (A, B, C, A, B, C, ...)
    so that a shared machine's load affects them alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    result = {}
    for name, values in times.items():
        values.sort()
        result[name] = {
            "median_ms": round(statistics.median(values), digits),
            "p10_ms": round(values[int(0.1 * (runs - 1))], digits),
            "p90_ms": round(values[int(0.9 * (runs - 1))], digits),
        }
    return result


def latency(
    cases: dict[str, tuple[Path | None, np.ndarray]],
    runs: int,
    warmup: int,
    size: int,
    threads: int,
) -> dict[str, Any]:
    """Median and p10/p90 ms per case; cases with no model time torchvision's resize of the image."""
    import torch
    from torchvision.transforms.v2.functional import resize

    from anomalib_fod.inference import OpenVINOModel

    compiled: dict[str, Any] = {}
    for xml, _ in cases.values():
        if xml is not None and xml not in compiled:
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
            compiled[xml] = OpenVINOModel(xml, "CPU", "f32", config).compiled

    def call(xml: Path | None, image: np.ndarray) -> Any:  # noqa: ANN401
        if xml is None:
            return lambda: resize(torch.from_numpy(image), [size, size], antialias=True)
        request = compiled[xml].create_infer_request()
        return lambda: request.infer({0: image})

    return time_alternately({name: call(xml, image) for name, (xml, image) in cases.items()}, runs, warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["fod", "ed", "cdo"], required=True)
    parser.add_argument("--root", type=Path, default=REPO / "anomalib_fod" / "data")
    parser.add_argument("--category", default="battery_weld")
    parser.add_argument("--ckpt", type=Path, default=None, help="a trained checkpoint (otherwise: train)")
    parser.add_argument("--image-size", type=int, default=256, help="training size (square)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int8", action="store_true", help="also INT8_PTQ and INT8_ACQ")
    parser.add_argument("--skip-acq", action="store_true", help="with --int8: INT8_PTQ only (INT8_ACQ takes long)")
    parser.add_argument("--max-drop", type=float, default=0.01, help="INT8_ACQ's accepted F1 drop")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ov-threads", type=int, default=1, help="OpenVINO CPU threads for the latency runs")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import openvino as ov
    import torch
    from anomalib.engine import Engine
    from export_parity import copy_images, engine_outputs, onnxruntime_outputs, openvino_outputs, parity
    from PIL import Image

    # Relative paths are the caller's: resolve them before the working directory changes below.
    for name in ("root", "ckpt", "workdir", "json"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"export_check_{args.model}_{args.category}_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # OpenVINOInferencer writes ./openvino_cache
    report: dict[str, Any] = {
        "model": args.model,
        "category": args.category,
        "image_size": args.image_size,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip(),  # noqa: S603, S607
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "openvino": ov.get_version(),
    }
    if args.ckpt is None:
        args.ckpt, report["fit_s"] = train(args, workdir)
        report["training"] = {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "limit_train_batches": args.limit_train_batches,
            "seed": args.seed,
        }
    report["checkpoint"] = str(args.ckpt)
    model = model_class(args.model).load_from_checkpoint(args.ckpt)
    paths = export_all(model, args, workdir)

    sources = sorted((args.root / args.category / "test").glob("*/*.png"))
    originals = copy_images(sources, workdir / "originals")
    engine = Engine(logger=False, default_root_dir=workdir / "predict", enable_progress_bar=False)
    reference = engine_outputs(engine, model, originals)
    with Image.open(sources[0]) as image:
        report["original_size"] = [image.height, image.width]
    runtimes = {"openvino": openvino_outputs(paths["any_size"], originals)}
    try:
        runtimes["onnxruntime"] = onnxruntime_outputs(paths["onnx"], originals)
    except ImportError:
        report["onnxruntime"] = "not installed"
    report["parity"] = {name: parity(reference, outputs) for name, outputs in runtimes.items()}
    print(f"[export_check] parity: {json.dumps(report['parity'])}", flush=True)

    report["image_auroc"] = {"engine_predict": image_auroc(reference), "openvino_fp32": image_auroc(runtimes["openvino"])}
    for name in ("int8_ptq", "int8_acq"):
        if name in paths:
            outputs = openvino_outputs(paths[name], originals)
            report["image_auroc"][f"openvino_{name}"] = image_auroc(outputs)
            report[f"{name}_vs_fp32"] = parity(runtimes["openvino"], outputs)
    print(f"[export_check] image AUROC: {json.dumps(report['image_auroc'])}", flush=True)

    from torchvision.transforms.v2.functional import resize

    original = load_batch(sorted(originals.iterdir())[0])
    square = resize(torch.from_numpy(original), [args.image_size, args.image_size], antialias=True).numpy()
    large = resize(torch.from_numpy(original), [900, 900], antialias=True).numpy()
    h, w = original.shape[-2:]
    cases: dict[str, tuple[Path | None, np.ndarray]] = {
        f"fixed graph, {args.image_size}x{args.image_size} input": (paths["fixed"], square),
        f"any-size graph, {args.image_size}x{args.image_size} input": (paths["any_size"], square),
        f"any-size graph, {h}x{w} input": (paths["any_size"], original),
        "any-size graph, 900x900 input": (paths["any_size"], large),
        f"torchvision resize {h}x{w} -> {args.image_size}": (None, original),
        f"torchvision resize 900x900 -> {args.image_size}": (None, large),
    }
    for name in ("int8_ptq", "int8_acq"):
        if name in paths:
            cases[f"{name} any-size graph, {args.image_size}x{args.image_size} input"] = (paths[name], square)
    load_before = os.getloadavg()[0]
    report["latency"] = latency(cases, args.runs, args.warmup, args.image_size, args.ov_threads)
    report["ov_threads"] = args.ov_threads
    report["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
