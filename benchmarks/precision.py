"""Reduced precision of exported FOD models, per dataset: float32, bfloat16, float16 and INT8 side by side.

For every category (MVTec layout under ``--root``) the script trains ``Fod(training_steps=N)`` with its other
defaults (or reuses the checkpoint in ``--workdir``), exports it to OpenVINO (any image size, float32 weights) and
to OpenVINO ``INT8_PTQ``, and runs every test image, at its own size, through

- ``Engine.predict``: the reference (the trained model's answers);
- torch with bfloat16 emulated (:func:`anomalib_fod.precision.emulate_precision`) on the exported graph's own
  computations: the in-graph resize and normalisation, the backbone, the Transformers and the scoring (with the
  blur) in bf16, the post-processor's thresholds and min-max in float32, as OpenVINO keeps them. Once for the
  whole, once per part (which part is sensitive), once for the whole in float16, and once for the scoring with
  its Mahalanobis distance as a sum of squares of the residual whitened by a triangular (Cholesky) factor of the
  precision matrix, instead of the quadratic form (whether that form is more robust in bf16);
- OpenVINO in f32 (the plugin's default), anomalib's stock ``OpenVINOInferencer`` with its defaults (the CPU's own
  precision: bf16 on CPUs with native bf16), ``INT8_PTQ`` in f32 and in the CPU's own precision, and
  ``anomalib-fod predict-folder`` with its defaults.

Per variant: image and pixel AUROC (torchmetrics; normalised scores and maps at the training size, masks resized
to it with nearest neighbours), labels flipped against the reference at the 0.5 threshold, largest and median
absolute score deviation, largest relative score deviation, largest map deviation; for OpenVINO the precision
read back from the compiled model and the batch-1 latency on one thread (median of ``--runs``, the variants timed
alternately on the first test image at its own size). Precision acts on inference, so a short training
(``--training-steps``, default 25) shows its effect at a fraction of the cost; the AUROCs are those of such a
model, not of ``Fod()``'s 250 steps.

Usage (from the repository root, ``datasets`` linking to the shared datasets; about 15 minutes per category on
one thread):
    OMP_NUM_THREADS=1 python benchmarks/precision.py --root datasets --workdir /tmp/precision \\
        --categories battery_weld bsdata_pitting mvtec_ad/bottle mvtec_ad/screw piped_paper_tl \\
        --json benchmarks/results/precision.json --markdown benchmarks/results/precision.md

Rerun with the same ``--workdir`` to reuse the checkpoints and exports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # export_parity.py: the parity helpers the export tests use

THRESHOLD = 0.5  # of anomalib's normalised scores


def cpu_flags() -> list[str]:
    """The reduced-precision flags of this CPU (Linux), e.g. ``avx512_bf16``, ``amx_bf16``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or "fp16" in f or f.startswith("amx") or f == "avx512_vnni")


def datamodule(root: Path, category: str, eval_batch_size: int = 8) -> Any:  # noqa: ANN401
    """An ``MVTecAD`` datamodule for ``root/category`` (``category`` may be a path such as ``mvtec_ad/bottle``)."""
    from anomalib.data import MVTecAD

    folder = root / category
    return MVTecAD(
        root=folder.parent,
        category=folder.name,
        train_batch_size=1,
        eval_batch_size=eval_batch_size,
        num_workers=0,
    )


def train(root: Path, category: str, steps: int, seed: int, workdir: Path) -> Path:
    """Fit ``Fod(training_steps=steps)`` at batch 1 (validation sets the thresholds); the checkpoint's path."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_fod import Fod

    seed_everything(seed)
    engine = Engine(logger=False, default_root_dir=workdir / "train", enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(Fod(training_steps=steps, visualizer=False), datamodule=datamodule(root, category))
    print(f"[precision] {category}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return Path(engine.trainer.checkpoint_callback.best_model_path)


def export(model: Any, root: Path, category: str, workdir: Path) -> dict[str, Path]:  # noqa: ANN401
    """OpenVINO any-size graphs, float32 weights and ``INT8_PTQ`` (calibrated on the validation images)."""
    from anomalib.deploy import CompressionType, ExportType
    from anomalib.engine import Engine

    engine = Engine(logger=False, default_root_dir=workdir / "engine", enable_progress_bar=False)
    paths = {"fp32": workdir / "fp32" / "weights" / "openvino" / "model.xml"}
    paths["int8_ptq"] = workdir / "int8_ptq" / "weights" / "openvino" / "model.xml"
    if not paths["fp32"].is_file():
        engine.export(model, ExportType.OPENVINO, export_root=workdir / "fp32")
    if not paths["int8_ptq"].is_file():
        engine.export(
            model,
            ExportType.OPENVINO,
            export_root=workdir / "int8_ptq",
            compression_type=CompressionType.INT8_PTQ,
            datamodule=datamodule(root, category),
        )
    return paths


def mask_for(source: Path, size: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask of a test image at ``size`` (nearest neighbours); zeros for a good image."""
    from PIL import Image

    mask_path = source.parents[2] / "ground_truth" / source.parent.name / f"{source.stem}_mask.png"
    if not mask_path.is_file():
        return np.zeros(size, dtype=bool)
    with Image.open(mask_path) as mask:
        resized = mask.convert("L").resize((size[1], size[0]), Image.Resampling.NEAREST)
        return np.asarray(resized) > 0


def whitened_distance(statistics: Any, residual: Any, covariance: str | None = None) -> Any:  # noqa: ANN401
    """``ResidualStatistics.forward`` as ``||(r - mu) L||`` with ``P = L L^T`` (Cholesky): a sum of squares."""
    covariance = covariance or statistics.covariance
    centred = residual.float() - statistics.mean
    distances = []
    if covariance != "position":
        distances.append((centred @ statistics.shared_factor).square().sum(-1).sqrt())
    if covariance != "shared":
        whitened = (centred.transpose(0, 1) @ statistics.position_factor).transpose(0, 1)
        distances.append(whitened.square().sum(-1).sqrt())
    return distances[0] if len(distances) == 1 else 0.5 * (distances[0] + distances[1])


@contextlib.contextmanager
def whitened_scoring(model: Any) -> Iterator[None]:  # noqa: ANN401
    """Score with :func:`whitened_distance` inside the block; the float32 factors (buffers, so that an emulation
    rounds them as a runtime rounds constants) come from the stored precisions in float64."""
    import torch

    generator = model.model.anomaly_map_generator
    try:
        for stats in generator.statistics:
            for name, precision in (("shared_factor", stats.precision), ("position_factor", stats.position_precision)):
                stats.register_buffer(name, torch.linalg.cholesky(precision.double()).float(), persistent=False)
            stats.forward = lambda residual, covariance=None, stats=stats: whitened_distance(stats, residual, covariance)
        yield
    finally:
        for stats in generator.statistics:
            del stats.forward, stats.shared_factor, stats.position_factor


def emulated_variants(model: Any) -> tuple[Any, dict[str, tuple[list[Any], Any, Callable[[Any], Any] | None]]]:  # noqa: ANN401
    """The exported graph's pre-processing (a module) and, by name, the modules to emulate, the dtype and a context
    to score in (or ``None``)."""
    import torch
    from torch import nn

    from anomalib_fod.models.pre_processing import apply_for_export

    class PreProcessing(nn.Module):
        """The exported graph's resize and normalisation."""

        def __init__(self, transform: Any) -> None:  # noqa: ANN401
            super().__init__()
            self.transform = transform

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return apply_for_export(self.transform, image)

    pre = PreProcessing(model.pre_processor.transform)
    fod = model.model
    parts = {
        "all": [pre, fod],
        "pre-processing": [pre],
        "backbone": [fod.feature_extractor],
        "Transformers": list(fod.levels),
        "scoring": [fod.anomaly_map_generator],
    }
    variants = {f"torch bf16 emulated: {name}": (modules, torch.bfloat16, None) for name, modules in parts.items()}
    variants["torch bf16 emulated: scoring, whitened form"] = (parts["scoring"], torch.bfloat16, whitened_scoring)
    variants["torch f16 emulated: all"] = (parts["all"], torch.float16, None)
    return pre, variants


def torch_outputs(model: Any, pre: Any, folder: Path, modules: list, dtype: Any, context: Any) -> Any:  # noqa: ANN401
    """The exported graph's computations in torch, ``modules`` in ``dtype``; the post-processor in float32."""
    import torch
    from export_parity import Outputs

    from anomalib_fod.deploy import load_rgb
    from anomalib_fod.precision import emulate_precision

    outputs = Outputs()
    scope = context(model) if context is not None else contextlib.nullcontext()
    with torch.no_grad(), scope, emulate_precision(modules, dtype):
        for path in sorted(folder.iterdir()):
            image = torch.from_numpy(load_rgb(path).transpose(2, 0, 1)[None].copy())
            prediction = model.post_processor(model.model(pre(image)))
            outputs.add(path.name, prediction.pred_score, prediction.pred_label, prediction.anomaly_map)
    return outputs


def openvino_model_outputs(
    xml: Path,
    folder: Path,
    precision: str,
    size: tuple[int, int] | None = None,
) -> tuple[Any, str]:  # noqa: ANN401
    """The plugin's ``OpenVINOModel`` on every image (one thread), resized to ``size`` first (float32, the training
    resize) if given; the outputs and the precision compiled."""
    from export_parity import Outputs

    from anomalib_fod.deploy import load_rgb, to_model_input
    from anomalib_fod.inference import OpenVINOModel

    model = OpenVINOModel(xml, "CPU", precision, {"INFERENCE_NUM_THREADS": 1})
    outputs = Outputs()
    for path in sorted(folder.iterdir()):
        result = model(to_model_input(load_rgb(path), size))
        outputs.add(path.name, result["pred_score"], result["pred_label"], result["anomaly_map"])
    return outputs, model.precision


def predict_folder_outputs(xml: Path, folder: Path, output: Path) -> Any:  # noqa: ANN401
    """``anomalib-fod predict-folder`` with its defaults: the scores and labels of its CSV (no maps)."""
    import csv

    from export_parity import Outputs

    from anomalib_fod.deploy import main

    status = main(["--model", str(xml), "--input", str(folder), "--output", str(output), "--no_progress", "true"])
    if status != 0:
        msg = f"predict-folder exited with {status}"
        raise RuntimeError(msg)
    outputs = Outputs()
    with (output / "predictions.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            outputs.score[Path(row["path"]).name] = float(row["pred_score"])
            outputs.label[Path(row["path"]).name] = row["pred_label"] == "1"
    return outputs


def metrics(reference: Any, outputs: Any, masks: dict[str, np.ndarray]) -> dict[str, Any]:  # noqa: ANN401
    """AUROCs of ``outputs`` and their deviation from ``reference`` (same images)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    names = sorted(reference.score)
    labels = torch.tensor([not n.startswith("good_") for n in names])
    scores = np.array([outputs.score[n] for n in names])
    want = np.array([reference.score[n] for n in names])
    result: dict[str, Any] = {
        "image_auroc": float(binary_auroc(torch.from_numpy(scores), labels.long())),
        "label_flips": int(sum(outputs.label[n] != reference.label[n] for n in names)),
        # the image that defines the adaptive threshold scores exactly 0.5: any rounding flips it
        "label_flips_at_threshold": int(
            sum(outputs.label[n] != reference.label[n] and abs(reference.score[n] - THRESHOLD) < 1e-6 for n in names)  # noqa: PLR2004
        ),
        "score_max_abs": float(np.abs(scores - want).max()),
        "score_median_abs": float(np.median(np.abs(scores - want))),
        "score_max_rel": float((np.abs(scores - want) / np.maximum(np.abs(want), 1e-12)).max()),
    }
    if outputs.anomaly_map:
        maps = torch.from_numpy(np.stack([outputs.anomaly_map[n] for n in names]).astype(np.float32))
        target = torch.from_numpy(np.stack([masks[n] for n in names]))
        result["pixel_auroc"] = float(binary_auroc(maps.flatten(), target.flatten().long()))
        result["map_max_abs"] = max(float(np.abs(outputs.anomaly_map[n] - reference.anomaly_map[n]).max()) for n in names)
    return result


def latency(xmls: dict[str, tuple[Path, str]], image: np.ndarray, runs: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Batch-1 median and p10/p90 ms on one thread, the variants timed alternately; the precision compiled."""
    from export_check import time_alternately

    from anomalib_fod.inference import OpenVINOModel

    config = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
    models = {name: OpenVINOModel(xml, "CPU", precision, config) for name, (xml, precision) in xmls.items()}
    requests = {name: model.compiled.create_infer_request() for name, model in models.items()}
    calls = {name: (lambda request=request: request.infer({0: image})) for name, request in requests.items()}
    timings = time_alternately(calls, runs, warmup, digits=2)
    return {
        name: {
            "latency_ms": row["median_ms"],
            "latency_p10_ms": row["p10_ms"],
            "latency_p90_ms": row["p90_ms"],
            "precision": models[name].precision,
        }
        for name, row in timings.items()
    }


def measure(args: argparse.Namespace, category: str) -> dict[str, Any]:
    """Every variant of one category."""
    from anomalib.engine import Engine
    from export_parity import copy_images, engine_outputs, openvino_outputs

    from anomalib_fod import Fod
    from anomalib_fod.deploy import load_rgb

    workdir = args.workdir / category.replace("/", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "model.ckpt"
    if not checkpoint.is_file():
        checkpoint.write_bytes(train(args.root, category, args.training_steps, args.seed, workdir).read_bytes())
    model = Fod.load_from_checkpoint(checkpoint).eval()
    xmls = export(model, args.root, category, workdir)

    sources = sorted(p for p in (args.root / category / "test").glob("*/*") if p.suffix.lower() in {".png", ".jpg"})
    folder = copy_images(sources, workdir / "images")
    start = time.perf_counter()
    reference = engine_outputs(
        Engine(logger=False, default_root_dir=workdir / "predict", enable_progress_bar=False), model, folder
    )
    print(f"[precision] {category}: Engine.predict in {time.perf_counter() - start:.0f} s", flush=True)
    map_size = next(iter(reference.anomaly_map.values())).shape
    masks = {f"{s.parent.name}_{s.name}": mask_for(s, map_size) for s in sources}
    report: dict[str, Any] = {"images": len(sources), "variants": {"Engine.predict (f32)": metrics(reference, reference, masks)}}

    def record(name: str, outputs: Any, **extra: Any) -> None:  # noqa: ANN401
        report["variants"][name] = {**metrics(reference, outputs, masks), **extra}
        print(f"[precision] {category}: {name}: {json.dumps(report['variants'][name])}", flush=True)

    os.chdir(workdir)  # anomalib's OpenVINOInferencer writes ./openvino_cache
    outputs, precision = openvino_model_outputs(xmls["fp32"], folder, "f32")
    record("OpenVINO f32 (the plugin's default)", outputs, precision=precision)
    record("OpenVINO, anomalib's OpenVINOInferencer defaults", openvino_outputs(xmls["fp32"], folder, stock=True))
    outputs, precision = openvino_model_outputs(xmls["fp32"], folder, "device", model.input_size)
    record("OpenVINO, the CPU's own precision, images resized to the training size outside", outputs, precision=precision)
    outputs, precision = openvino_model_outputs(xmls["int8_ptq"], folder, "f32")
    record("OpenVINO INT8_PTQ, f32", outputs, precision=precision)
    outputs, precision = openvino_model_outputs(xmls["int8_ptq"], folder, "device")
    record("OpenVINO INT8_PTQ, the CPU's own precision", outputs, precision=precision)
    record("predict-folder (its defaults)", predict_folder_outputs(xmls["fp32"], folder, workdir / "predict_folder"))

    pre, variants = emulated_variants(model)
    for name, (modules, dtype, context) in variants.items():
        if args.skip_parts and name.split(": ")[1] not in {"all", "scoring", "scoring, whitened form"}:  # f16: all
            continue
        start = time.perf_counter()
        record(name, torch_outputs(model, pre, folder, modules, dtype, context), seconds=round(time.perf_counter() - start))

    image = load_rgb(sources[0]).transpose(2, 0, 1)[None].copy()
    timed = {
        "OpenVINO f32": (xmls["fp32"], "f32"),
        "OpenVINO, the CPU's own precision": (xmls["fp32"], "device"),
        "OpenVINO INT8_PTQ, f32": (xmls["int8_ptq"], "f32"),
        "OpenVINO INT8_PTQ, the CPU's own precision": (xmls["int8_ptq"], "device"),
    }
    report["latency"] = latency(timed, image, args.runs, args.warmup)
    report["latency_image"] = list(image.shape[-2:])
    print(f"[precision] {category}: latency {json.dumps(report['latency'])}", flush=True)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The results as one table per category."""
    lines = [
        "# Reduced precision of exported FOD models",
        "",
        f"`{report['command']}`",
        "",
        f"{report['date']}, commit {report['commit']}, OpenVINO {report['openvino']}, CPU {report['cpu']} "
        f"(flags: {', '.join(report['cpu_flags']) or 'none'}; OpenVINO's default CPU precision here: "
        f"{report['cpu_default_precision']}), `Fod(training_steps={report['training_steps']})` with its other "
        "defaults at 256x256, batch 1. Deviations are against `Engine.predict` on the same files (normalised "
        "scores and maps); flips at the 0.5 threshold.",
        "",
    ]
    for category, result in report["categories"].items():
        lines += [
            f"## {category} ({result['images']} test images at their own size)",
            "",
            "| variant | image AUROC | pixel AUROC | labels flipped | max / median abs score dev. | max rel. score dev. "
            "| max map dev. |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in result["variants"].items():
            precision = f" (compiled: {row['precision']})" if "precision" in row else ""
            pixel = f"{row['pixel_auroc']:.4f}" if "pixel_auroc" in row else "-"
            map_dev = f"{row['map_max_abs']:.3g}" if "map_max_abs" in row else "-"
            at_threshold = row.get("label_flips_at_threshold", 0)
            flips = f"{row['label_flips']}" + (f" ({at_threshold} at the threshold)" if at_threshold else "")
            lines.append(
                f"| {name}{precision} | {row['image_auroc']:.4f} | {pixel} | {flips} | "
                f"{row['score_max_abs']:.3g} / {row['score_median_abs']:.3g} | {row['score_max_rel']:.3g} | {map_dev} |",
            )
        if "latency" in result:
            height, width = result["latency_image"]
            lines += ["", f"Latency, batch 1, one thread, a {height}x{width} image (timed alternately):", ""]
            lines += ["| graph | compiled in | median ms (p10-p90) |", "|---|---|---|"]
            for name, row in result["latency"].items():
                lines.append(
                    f"| {name} | {row['precision']} | {row['latency_ms']} ({row['latency_p10_ms']}-{row['latency_p90_ms']}) |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "datasets", help="folder of MVTec-layout categories")
    parser.add_argument("--categories", nargs="+", default=["battery_weld"], help="paths under --root")
    parser.add_argument("--training-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per OpenVINO variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--skip-parts",
        action="store_true",
        help="emulate only the whole model and its scoring (the part-wise emulation runs no exported graph)",
    )
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoints and exports (reused when there)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("root", "workdir", "json", "markdown"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    missing = [c for c in args.categories if not (args.root / c / "test").is_dir()]
    if missing:
        parser.error(f"no test/ folder under --root {args.root} for {missing}")

    import openvino as ov
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report: dict[str, Any] = {
        "command": "python benchmarks/precision.py " + " ".join(
            "<workdir>" if Path(arg).resolve() == args.workdir else arg for arg in (argv if argv is not None else sys.argv[1:])
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip(),  # noqa: S603, S607
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "cpu": ov.Core().get_property("CPU", "FULL_DEVICE_NAME"),
        "cpu_flags": cpu_flags(),
        "cpu_default_precision": ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
        "openvino": ov.get_version(),
        "training_steps": args.training_steps,
        "categories": {},
    }
    for category in args.categories:
        report["categories"][category] = measure(args, category)
        if args.json:  # after every category: a long run keeps what it measured
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
