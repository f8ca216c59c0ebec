"""Cost measurements of one cell: throughput, OpenVINO latency, memory and file sizes."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage`` ``ru_maxrss``).

    It is process-wide and never decreases: run each cell in its own process to get per-cell
    peaks (the harness does unless ``isolate_cells: false``).
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by torch in this process (MiB), ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def size_mb(*paths: Path | None) -> float | None:
    """Total size of existing files (MiB); ``None`` when none exists."""
    existing = [p for p in paths if p is not None and Path(p).is_file()]
    if not existing:
        return None
    return sum(Path(p).stat().st_size for p in existing) / 2**20


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_throughput(
    forward: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 32,
    min_seconds: float = 1.0,
    max_passes: int = 20,
) -> dict[str, float]:
    """Images per second of ``forward`` over ``images`` in batches, after one warm-up batch.

    ``images`` are moved to ``device`` before timing (host-to-device copies are not timed).
    Whole passes over the images are repeated until ``min_seconds`` have elapsed (at most
    ``max_passes``), so tiny test sets still give a stable figure.
    """
    batches = [chunk.to(device) for chunk in images.split(batch_size)]
    with torch.no_grad():
        forward(batches[0])
        _synchronise(device)
        passes, start = 0, time.perf_counter()
        while True:
            for batch in batches:
                forward(batch)
            _synchronise(device)
            passes += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds or passes >= max_passes:
                break
    return {
        "infer_img_s": passes * images.shape[0] / elapsed,
        "infer_batch": float(batch_size),
        "infer_images": float(images.shape[0]),
        "infer_passes": float(passes),
    }


def openvino_latency(xml_path: Path, image: torch.Tensor, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median (and p90) latency in ms of the OpenVINO IR on the CPU, batch 1, synchronous, compiled in float32
    (the precision the plugin deploys in by default; OpenVINO's own CPU default is bf16 where the CPU has it).

    Args:
        xml_path: the exported ``model.xml``.
        image: one ``(3, H, W)`` or ``(1, 3, H, W)`` float image at the export size.
        runs: timed inferences after ``warmup`` untimed ones.
    """
    from anomalib_fod.inference import OpenVINOModel  # noqa: PLC0415 - OpenVINO is an optional dependency

    request = OpenVINOModel(xml_path, "CPU").compiled.create_infer_request()
    array = image.reshape(1, *image.shape[-3:]).float().cpu().numpy()
    for _ in range(warmup):
        request.infer({0: array})
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({0: array})
        timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    return {
        "openvino_ms": statistics.median(timings),
        "openvino_p90_ms": timings[min(len(timings) - 1, int(0.9 * len(timings)))],
        "openvino_runs": float(runs),
    }


def model_device(accelerator: str) -> torch.device:
    """The device a cell's model runs on for the throughput measurement."""
    if accelerator in {"gpu", "cuda"} or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")

