"""One benchmark cell (dataset x model x seed): fit, test, predict, measure, write a JSON.

Run by the harness in its own process so that the peak memory figures belong to this cell::

    python -m anomalib_fod.benchmark.cell --spec RUN_DIR/work/<cell>/spec.json

Steps: seed everything; build the datamodule (validation = test set, used only by anomalib's
post-processor) and the model; ``Engine.fit`` (validation once, after the last epoch);
``Engine.test`` (anomalib's post-processed metrics); ``Engine.predict`` with the
post-processor's normalisation switched off, giving raw scores and maps for the exact metrics;
torch throughput; optionally an OpenVINO export and its batch-1 latency. The result JSON
(``RUN_DIR/cells/<cell>.json``) marks the cell as done; the raw predictions go next to it
(``<cell>.npz``). A failure writes ``<cell>.error.json`` instead and the cell is retried on the
next run.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anomalib_fod.callbacks import ResumableInterruptCallback
from anomalib_fod.evaluation import collect_predictions, exact_metrics, raw_post_processing
from anomalib_fod.typed_cli import run_function

from .config import CellSpec
from .cost import model_device, openvino_latency, peak_gpu_mb, peak_rss_mb, size_mb, torch_throughput
from .curve import TestCurve
from .environment import environment
from .jsonio import failure_record, write_json
from .resume import RESUME_CHECKPOINT, CellCheckpoint, discard_resume_state, find_resume_point

# The exported graph is built with torch's dynamo exporter, which emits opset 18.
ONNX_OPSET = 18


def timing_images(datamodule: Any, image_size: tuple[int, int], limit: int) -> torch.Tensor:  # noqa: ANN401
    """Up to ``limit`` test images, resized to the model's input size (un-normalised, [0, 1])."""
    from torchvision.transforms.v2.functional import resize  # noqa: PLC0415

    chunks, count = [], 0
    for batch in datamodule.test_dataloader():
        chunks.append(resize(batch.image, list(image_size), antialias=True))
        count += batch.image.shape[0]
        if count >= limit:
            break
    return torch.cat(chunks)[:limit].contiguous()


def _float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in metrics.items()}


def _checkpoint(engine: Any, work_dir: Path) -> Path:  # noqa: ANN401
    """The checkpoint of the fitted model (Engine's own, else one saved here)."""
    callback = engine.trainer.checkpoint_callback
    path = Path(callback.best_model_path) if callback is not None and callback.best_model_path else None
    if path is None or not path.is_file():
        path = work_dir / "model.ckpt"
        engine.trainer.save_checkpoint(path)
    return path


def export_and_time(
    engine: Any,  # noqa: ANN401 - anomalib Engine, imported lazily
    model: nn.Module,
    spec: CellSpec,
    image: torch.Tensor,
) -> dict[str, Any]:
    """OpenVINO export at the input size and its batch-1 CPU latency; errors are recorded, not raised."""
    from anomalib.deploy import ExportType  # noqa: PLC0415

    result: dict[str, Any] = {"openvino_ms": math.nan, "export_mb": math.nan, "openvino_error": None}
    try:
        model.cpu()
        xml = engine.export(
            model,
            ExportType.OPENVINO,
            export_root=spec.work_dir / "export",
            input_size=tuple(spec.image_size),
            # Static batch 1 (the latency measured): with anomalib's default dynamic batch axis,
            # torch 2.14's exporter specialises PatchCore's batch to the example's 2.
            onnx_kwargs={"opset_version": ONNX_OPSET, "dynamic_axes": {}},
        )
        if xml is None or not Path(xml).is_file():
            msg = f"Engine.export returned {xml!r}, no model.xml"
            raise FileNotFoundError(msg)
        xml = Path(xml)
        result["export_path"] = str(xml)
        result["export_mb"] = size_mb(xml, xml.with_suffix(".bin"))
        result.update(openvino_latency(xml, image, runs=spec.openvino_runs))
    except Exception as error:  # noqa: BLE001 - an export failure is a result, not a crash
        result["openvino_error"] = f"{type(error).__name__}: {error}"[:1000]
    return result


def run_cell(spec: CellSpec, rss_scope: str = "cell process", startup_s: float | None = None) -> dict[str, Any]:
    """Run one cell and return its result record (also written to ``spec.result_path``).

    Args:
        spec: the cell.
        rss_scope: what the peak-RSS figures cover: ``"cell process"`` when the cell runs in its
            own process, ``"whole harness process"`` otherwise (then they include earlier cells).
        startup_s: seconds the cell's process spent starting (Python + imports), if known.
    """
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from .data import build_datamodule  # noqa: PLC0415
    from .models import build_model  # noqa: PLC0415

    started = datetime.now(UTC).isoformat(timespec="seconds")
    cell_start = time.perf_counter()
    # Recorded before training: the git commit is the code this cell imported, not a later one.
    started_environment = environment()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed, workers=True)
    datamodule = build_datamodule(spec.dataset, spec.model.train_batch_size)
    model, weights = build_model(
        spec.model.class_path,
        spec.model.init_args,
        spec.backbone,
        spec.layers,
        tuple(spec.image_size),
        spec.weights_path,
    )
    # A model's trainer_arguments override the Engine's (PatchCore and PaDiM fix one epoch).
    epochs_planned = int(model.trainer_arguments.get("max_epochs") or spec.model.max_epochs)
    curve = TestCurve(datamodule) if spec.model.test_curve else None
    # After the curve: the per-epoch checkpoint then holds the epoch's curve point.
    clock = CellCheckpoint(spec.work_dir / RESUME_CHECKPOINT, spec.fingerprint())
    resume = find_resume_point(spec.work_dir, spec.fingerprint(), plain_hparams(model))
    engine = Engine(
        # The harness opts in to the replayable data order: a killed cell resumes from its last epoch.
        callbacks=[*([curve] if curve is not None else []), ResumableInterruptCallback(), clock],
        default_root_dir=spec.work_dir / "engine",
        logger=False,
        max_epochs=spec.model.max_epochs,
        # Validation (= the test set) only feeds anomalib's thresholds and min-max: once, at the end (a model that
        # stops itself after a step budget, as Fod does, moves it to the epoch it stops in).
        check_val_every_n_epoch=epochs_planned,
        accelerator=spec.accelerator,
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    if resume is None:
        print(f"[cell] {spec.label}: fit", flush=True)
    else:
        print(f"[cell] {spec.label}: fit, resumed after {resume.epochs_done} epochs from {resume.checkpoint}", flush=True)
    clock.start()
    engine.fit(model, datamodule=datamodule, ckpt_path=None if resume is None else resume.checkpoint)
    fit_s_here = clock.seconds_here - (curve.seconds_here if curve is not None else 0.0)
    # Earlier processes' fit time comes with the checkpoint into the clock (unknown for an adopted
    # one); the curve's evaluations, restored with it, are not training time.
    adopted = resume is not None and resume.adopted
    fit_s = math.nan if adopted else clock.fit_seconds - (curve.seconds if curve is not None else 0.0)
    epochs = int(engine.trainer.current_epoch)
    rss_fit = peak_rss_mb()
    checkpoint = _checkpoint(engine, spec.work_dir)
    n_train = len(datamodule.train_data)

    print(f"[cell] {spec.label}: test", flush=True)
    start = time.perf_counter()
    anomalib_metrics = _float_dict(engine.test(model, datamodule=datamodule, verbose=False)[0])
    test_s = time.perf_counter() - start

    print(f"[cell] {spec.label}: predict (raw scores)", flush=True)
    start = time.perf_counter()
    with raw_post_processing(model):
        predictions = engine.predict(model, datamodule=datamodule, return_predictions=True)
    predict_s = time.perf_counter() - start
    raw = collect_predictions(predictions)
    del predictions
    metrics = exact_metrics(raw["scores"], raw["labels"], raw["maps"], raw["masks"])

    print(f"[cell] {spec.label}: timing", flush=True)
    start = time.perf_counter()
    images = timing_images(datamodule, tuple(spec.image_size), spec.inference_max_images)
    device = model_device(spec.accelerator)
    model.eval().to(device)
    throughput = torch_throughput(model, images, device, batch_size=spec.inference_batch_size)
    timing_s = time.perf_counter() - start
    openvino: dict[str, Any] = {"openvino_ms": math.nan, "export_mb": math.nan, "openvino_error": "disabled"}
    if spec.openvino:
        print(f"[cell] {spec.label}: OpenVINO export + latency", flush=True)
        start = time.perf_counter()
        openvino = export_and_time(engine, model, spec, images[0])
        openvino["export_and_latency_s"] = time.perf_counter() - start

    arrays: dict[str, np.ndarray] = {
        "scores": raw["scores"],
        "labels": raw["labels"],
        "paths": np.array(raw["paths"], dtype=str),
    }
    if spec.save_maps and raw["maps"] is not None:
        arrays["maps"] = raw["maps"].astype(np.float16)
    if spec.save_maps and raw["masks"] is not None:
        arrays["masks"] = raw["masks"]
    spec.predictions_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(spec.predictions_path, **arrays)

    cost = {
        "fit_s": fit_s,
        "fit_s_this_process": fit_s_here,
        "test_s": test_s,
        "predict_s": predict_s,
        "timing_s": timing_s,
        "startup_s": startup_s,
        "epochs": epochs,
        "n_train": n_train,
        "n_test": int(raw["labels"].size),
        "train_img_s": n_train * epochs / fit_s if fit_s > 0 else math.nan,
        **throughput,
        "infer_device": str(device),
        **openvino,
        "checkpoint_mb": size_mb(checkpoint),
        "peak_rss_fit_mb": rss_fit,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
        "cell_s": time.perf_counter() - cell_start,
    }
    result = {
        "cell_id": spec.cell_id,
        "dataset": spec.dataset.name,
        "model": spec.model.name,
        "seed": spec.seed,
        "status": "ok",
        "fingerprint": spec.fingerprint(),
        "metrics": metrics,
        "anomalib_metrics": anomalib_metrics,
        "cost": cost,
        "test_curve": None if curve is None else {"points": curve.points, "seconds": curve.seconds},
        "rss_scope": rss_scope,
        "resumed": None if resume is None else resume.to_dict(),
        "weights": weights,
        "hparams": plain_hparams(model),
        "checkpoint": str(checkpoint),
        "predictions": spec.predictions_path.name,
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": started_environment,
        "spec": spec.to_dict(),
    }
    write_json(spec.result_path, result)
    spec.error_path.unlink(missing_ok=True)
    discard_resume_state(spec.work_dir)  # the engine's final checkpoint stays
    return result


def plain_hparams(model: torch.nn.Module) -> dict[str, Any]:
    """The model's saved hyper-parameters that are plain data (what the cell actually trained)."""
    plain = (bool, int, float, str, type(None))
    hparams = getattr(model, "hparams", {})
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in hparams.items()
        if isinstance(value, plain) or (isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value))
    }


def record_failure(spec: CellSpec, error: BaseException, rss_scope: str) -> dict[str, Any]:
    """Write and return the error record of a cell that raised ``error``."""
    message = f"{type(error).__name__}: {error}"[:2000]
    return failure_record(spec, message, rss_scope, traceback="".join(traceback.format_exception(error))[-6000:])


def _process_age_s() -> float | None:
    """Seconds since this process started (Python start-up and imports, for a fresh cell process)."""
    try:
        import psutil  # noqa: PLC0415 - optional

        return time.time() - psutil.Process().create_time()
    except (ImportError, OSError):
        return None


def cell(spec: Path) -> int:
    """Run one benchmark cell in this process (the harness starts one process per cell).

    Args:
        spec: cell spec JSON written by the harness.

    Returns:
        0 when the cell finished, 1 when it failed (its error JSON says why).
    """
    cell_spec = CellSpec.from_dict(json.loads(spec.read_text(encoding="utf-8")))
    startup_s = _process_age_s()
    try:
        run_cell(cell_spec, rss_scope="cell process", startup_s=startup_s)
    except Exception as error:  # noqa: BLE001 - recorded for the harness, exit code says it failed
        record_failure(cell_spec, error, rss_scope="cell process")
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m anomalib_fod.benchmark.cell --spec SPEC.json``."""
    return run_function(cell, argv, prog="python -m anomalib_fod.benchmark.cell")


if __name__ == "__main__":
    raise SystemExit(main())
