"""Micro-benchmark of FOD's training and inference steps, with the FLOP-bound time for comparison.

    python benchmarks/speed.py                                     # Lite0 + WRN50, batch 1/8/32, 256x256
    python benchmarks/speed.py --backbones tf_efficientnet_lite0 --batch-sizes 1 8 --repeats 3
    python benchmarks/speed.py --device cuda --precision bf16      # bf16 autocast (KL/entropy stay fp32)
    python benchmarks/speed.py --device cuda --compile             # torch.compile'd Transformers
    git worktree add --detach ../fod-old <commit>                  # an older version, timed alternately:
    python benchmarks/speed.py --backbones tf_efficientnet_lite0 --batch-sizes 1 4 8 --baseline ../fod-old

For each backbone and batch size it times, after warm-up, the median of ``--repeats`` runs of:

- **train step**: frozen backbone (no grad) + both level Transformers forward/backward (the two-stage
  minimax loss) + one Adam step, i.e. an uncached step. ``train (cached)``: the same without the
  backbone, which is what every epoch after the first costs with ``cache_features=True``.
- **inference step**: backbone + Transformers + scoring (anomaly map, blur, max) under ``no_grad``,
  and the split between those three parts (each timed separately).

It reports images/s, peak memory (RSS growth over the step on CPU, ``max_memory_allocated`` on CUDA),
the matmul/conv FLOPs per image of the inference step (``torch.utils.flop_counter``, backbone and
Transformers separately, counted on the plain attention path so fused kernels cannot hide any), the
rate of a 1024^3 matmul on this machine and threads (fp32, or bf16 with ``--precision bf16``), and the
ratios of the measured times to their FLOP-bound times: inference ``FLOPs / rate``, a training step
``3 x FLOPs / rate``. ``--baseline DIR`` also times another version of the package (a source tree,
e.g. a ``git worktree`` of an older commit) in alternation with this one, against the same rate. Random weights: timing does not depend on them. Training batches whose estimated
memory exceeds 80% of the available RAM are skipped on CPU (an OOM kill would lose every result),
and said so.

The original FOD code trains at about 7 images/s on an H100 (batch 1, its authors' reference run) and
does not run on a CPU; on CUDA the report gives our training throughput as a multiple of that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from anomalib_fod.benchmark.environment import cpu_model

ORIGINAL_H100_TRAIN_IMG_S = 7.0  # the original code's reference run: 0.13-0.15 s per batch-1 step on an H100


class PeakRss:
    """Peak resident set over a block above ``base`` bytes, sampled every 2 ms (CPU memory of a step).

    ``base`` is the RSS of the built model before any step: memory a previous step freed stays
    resident (see ``keep_freed_memory_on_cpu``), so growth from the block's own start would miss it.
    """

    def __init__(self, base: int) -> None:
        import psutil  # noqa: PLC0415

        self.process = psutil.Process()
        self.base = base
        self.peak = base
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(step: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``step`` in seconds after ``warmup`` untimed runs."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Dense ``size x size`` matmul throughput in FLOP/s on ``device`` (the compute bound's rate: 1024^3)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, repeats, warmup=2)
    return 2 * size**3 / seconds


def count_flops(step: Callable[[], Any]) -> int:
    """Matmul/conv FLOPs of one call (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def build(backbone: str, image_size: int, device: torch.device, score: str = "default") -> Any:  # noqa: ANN401 - a Fod
    """A default-sized FOD (random backbone weights) with references (and statistics) of random images.

    ``score="paper"``: the paper's model (three layers) and score (reconstruction times the inter-branch
    divergence), whose inference computes every attention's divergence; the default (one layer, the
    whitened residual) needs only the attention outputs.
    """
    from anomalib_fod import Fod  # noqa: PLC0415

    paper = {"scoring": "rec_div", "reconstruction_term": "mse_cos", "num_layers": 3, "map_level_weights": None,
             "map_align_corners": True}
    paper = paper if score == "paper" else {}
    model = Fod(backbone=backbone, pre_trained=False, image_size=image_size, visualizer=False, **paper).to(device)
    with torch.no_grad():
        images = torch.randn(2, 3, image_size, image_size, device=device)
        features = model.model.extract_features(images)
        model.model.set_mean_reference([f.mean(dim=0) for f in features])
        generator = model.model.anomaly_map_generator
        if getattr(generator, "needs_statistics", False):
            from anomalib_fod.models.fod.fitting import fit_statistics  # noqa: PLC0415

            fit_statistics(model.model, [features])
        if getattr(generator, "nearest_applies", False) and len(generator.nearest):
            fill_nearest_banks(generator, [f.shape[1] for f in features], model.model.settings.nearest_tokens, device)
        if getattr(generator, "fine", None) is not None or getattr(generator, "aligned", None) is not None:
            fit_map_levels_on(model.model, images)  # the default's map-only levels; their units read the whole map
    return model


def fit_map_levels_on(fod: Any, images: torch.Tensor) -> None:  # noqa: ANN401 - a FodModel
    """Fit ``fod``'s map-only levels on ``images`` alone (the levels' statistics are fitted from their features).
    The aligned level takes part whatever the random images' position share: timed where it costs most."""
    from anomalib_fod.models.fod.fitting import MapLevelSums, TrainingImages, fit_map_levels  # noqa: PLC0415
    from anomalib_fod.models.fod.residual_statistics import ResidualAccumulator  # noqa: PLC0415

    generator = fod.anomaly_map_generator
    if generator.aligned is not None:
        generator.aligned.limit = 0.0
    stages = MapLevelSums(
        None if generator.fine is None else ResidualAccumulator(per_position=True),
        None if generator.aligned is None else ResidualAccumulator(per_position=True),
    )
    features = fod.extract_map_features(images)
    for accumulator, stage in ((stages.finer, features.finer), (stages.finest, features.finest)):
        if accumulator is not None:
            accumulator.add(stage.flatten(2).transpose(1, 2))
    fit_map_levels(fod, TrainingImages([images], None, images.device, progress=False), stages)


def fill_nearest_banks(generator: Any, channels: list[int], size: int, device: torch.device) -> None:  # noqa: ANN401
    """Full banks of random tokens and unit z-units: the default's inference cost where the nearest-token score
    takes part (on a product it leaves out, the cost is the model's without it). Two random images hold too few
    tokens for a full bank, and the cost is the bank's size, not its contents."""
    for level, width in zip(generator.nearest, channels, strict=True):
        level.set_bank(torch.zeros(width), torch.eye(width), torch.randn(size, width))
        level.to(device)
        level.set_units(torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0]))


def bench_one(args: argparse.Namespace, backbone: str, batch: int, device: torch.device, rate: float) -> dict:
    """One backbone at one batch size (run in a fresh process, so its peak memory is its own)."""
    model = build(backbone, args.image_size, device, args.score)
    fod = model.model
    if args.compile:
        for level in fod.levels:  # what Fod(compile_transformers=True) does in setup
            level.compile()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    )
    optimizer = torch.optim.Adam([p for p in fod.parameters() if p.requires_grad], lr=1e-4)
    size = (args.image_size, args.image_size)
    for batch in [batch]:
        images = torch.randn(batch, 3, *size, device=device)
        row: dict[str, Any] = {"backbone": backbone, "batch": batch, "image_size": args.image_size, "score": args.score}

        def backbone_pass(images: torch.Tensor = images) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
            """The levels' features and what the map-only levels read (one pass)."""
            with autocast:
                features = fod.extract_map_features(images)
                stages = [None if stage is None else stage.float() for stage in (features.finer, features.finest)]
                return [f.float() for f in features.levels], stages

        def features(images: torch.Tensor = images) -> list[torch.Tensor]:
            with autocast:
                return [f.float() for f in fod.extract_features(images)]

        def train_step(cached_features: list[torch.Tensor] | None = None, images: torch.Tensor = images) -> None:
            fod.train()
            with autocast:
                feats = cached_features if cached_features is not None else features(images)
                output = fod.forward_features(feats)
                loss, _ = model.loss(output.tokens, output.levels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def infer(images: torch.Tensor = images) -> torch.Tensor:
            fod.eval()
            with torch.no_grad(), autocast:
                return fod(images).anomaly_map

        base_rss = _rss()
        row["infer_peak_mb"] = _measure_memory(device, infer, base_rss)
        cached, cached_stages = backbone_pass()

        def transformers() -> Any:  # noqa: ANN401
            fod.eval()
            with torch.no_grad(), autocast:
                return fod.run_levels(cached)

        run = transformers()

        def scoring(stages: list[torch.Tensor | None] = cached_stages) -> Any:  # noqa: ANN401
            with torch.no_grad(), autocast:
                return fod.anomaly_map_generator(run.tokens, run.levels, run.grids, size, *stages)

        if args.skip_train:
            row["train_skipped"] = args.skip_train
        else:
            row["train_peak_mb"] = _measure_memory(device, lambda: train_step(), base_rss)
            row["train_s"] = median_time(train_step, device, args.repeats)
            row["train_img_s"] = batch / row["train_s"]
            row["train_cached_s"] = median_time(lambda: train_step(cached), device, args.repeats)
            row["train_cached_img_s"] = batch / row["train_cached_s"]
            if device.type == "cuda":
                row["train_x_original"] = row["train_img_s"] / ORIGINAL_H100_TRAIN_IMG_S
        row["infer_s"] = median_time(infer, device, args.repeats)
        row["infer_img_s"] = batch / row["infer_s"]
        row["split_backbone_s"] = median_time(backbone_pass, device, args.repeats)
        row["split_transformer_s"] = median_time(transformers, device, args.repeats)
        row["split_scoring_s"] = median_time(scoring, device, args.repeats)
        one = images[:1]
        backbone_flops = count_flops(lambda: fod.extract_features(one))
        feats_one = [f[:1] for f in cached]
        fod.eval()
        with torch.no_grad():
            # keep_maps takes the plain path whatever the code's fast paths are, so the count is the
            # model's arithmetic (a fused attention kernel is invisible to the FLOP counter).
            transformer_flops = count_flops(lambda: fod.run_levels(feats_one, keep_maps=True))
        row.update(backbone_gflop=backbone_flops / 1e9, transformer_gflop=transformer_flops / 1e9)
        flops = row
        bound = (flops["backbone_gflop"] + flops["transformer_gflop"]) * 1e9 / rate
        row["flop_bound_ms_per_img"] = bound * 1e3
        row["infer_ms_per_img"] = row["infer_s"] / batch * 1e3
        row["infer_over_flop_bound"] = row["infer_ms_per_img"] / row["flop_bound_ms_per_img"]
        if "train_s" in row:  # a training step's bound: 3x the forward FLOPs (forward + two backward matmuls)
            row["train_over_flop_bound"] = row["train_s"] / batch / (3 * bound)
            cached_bound = 3 * flops["transformer_gflop"] * 1e9 / rate
            row["train_cached_over_flop_bound"] = row["train_cached_s"] / batch / cached_bound
    return row


def run_isolated(
    args: argparse.Namespace, backbone: str, batch: int, rate: float, skip_train: str, code: Path | None = None
) -> dict:
    """:func:`bench_one` in a child process; its JSON row comes back on the last stdout line.

    ``code``: a source tree of another version of the package (e.g. a ``git worktree`` of an older
    commit) that the child imports instead of this one, with the allocator setting that version's
    ``Fod.setup`` applied on a CPU (``keep_freed_memory_on_cpu``), so its row is what it gave users.
    """
    command = [
        sys.executable,
        __file__,
        "--single",
        backbone,
        str(batch),
        "--rate",
        str(rate),
        "--image-size",
        str(args.image_size),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--repeats",
        str(args.repeats),
        "--score",
        args.score,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.compile:
        command.append("--compile")
    if skip_train:
        command += ["--skip-train", skip_train]
    env = dict(os.environ)
    label = "current"
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH", "")]))
        command += ["--allocator", "mallopt"]
        label = f"baseline ({code.name})"
    elif args.allocator != "default":
        command += ["--allocator", args.allocator]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)  # noqa: S603 - our own script
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"code": label, "backbone": backbone, "batch": batch, "error": f"exit {done.returncode}: {tail}"}
    return {"code": label, **json.loads(done.stdout.strip().splitlines()[-1])}


def _available_mb() -> float:
    import psutil  # noqa: PLC0415

    return psutil.virtual_memory().available / 2**20


def _rss() -> int:
    import psutil  # noqa: PLC0415

    return psutil.Process().memory_info().rss


def _measure_memory(device: torch.device, step: Callable[[], Any], base_rss: int = 0) -> float:
    """Peak memory of one call in MiB: CUDA allocator peak, or RSS above ``base_rss`` on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    with PeakRss(base_rss) as peak:
        step()
    return peak.growth_mb


def _line(row: dict[str, Any]) -> str:
    who = f"[{row.get('code', 'current')}] {row['backbone']} batch {row['batch']}"
    if "error" in row:
        return f"{who}: FAILED {row['error'][-300:]}"
    train = (
        row.get("train_skipped")
        and f"train skipped ({row['train_skipped']})"
        or f"train {row['train_img_s']:.2f} img/s ({row['train_over_flop_bound']:.2f}x its bound; cached "
        f"{row['train_cached_img_s']:.2f}), {row['train_peak_mb']:.0f} MiB"
    )
    return (
        f"{who}: {train}; infer {row['infer_img_s']:.2f} img/s, "
        f"{row['infer_peak_mb']:.0f} MiB; split backbone/transformer/scoring "
        f"{row['split_backbone_s']:.3f}/{row['split_transformer_s']:.3f}/{row['split_scoring_s']:.3f} s; "
        f"{row['infer_over_flop_bound']:.2f}x the FLOP-bound time"
    )


def markdown(rows: list[dict[str, Any]], environment: dict[str, Any]) -> str:
    """The results as a Markdown table with the environment above it.

    Bounds: FLOPs (matmuls and convolutions of the model's forward) divided by the measured rate of a
    1024^3 matmul; a training step's bound is 3x its forward FLOPs (the cached step: 3x the Transformers').
    """
    lines = [
        f"- device: {environment['device']}; threads: {environment['threads']}; precision: {environment['precision']}; "
        f"matmul rate (1024^3): {environment['matmul_gflop_s']:.0f} GFLOP/s; torch {environment['torch']}; "
        f"date {environment['date']}",
        "",
        "| code | backbone | batch | train img/s | train / bound | train img/s (cached features) | cached / bound | "
        "train peak MiB | infer img/s | infer peak MiB | backbone / transformer / scoring s | "
        "GFLOP/img (backbone + transformer) | infer ms/img | FLOP-bound ms/img | infer / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        code = r.get("code", "current")
        if "error" in r:
            lines.append(f"| {code} | {r['backbone']} | {r['batch']} | failed: {r['error'][-120:]!r} |" + " |" * 11)
            continue
        train = (
            ("skipped: " + r["train_skipped"], "–", "–", "–", "–")
            if "train_skipped" in r
            else (
                f"{r['train_img_s']:.2f}",
                f"{r['train_over_flop_bound']:.2f}",
                f"{r['train_cached_img_s']:.2f}",
                f"{r['train_cached_over_flop_bound']:.2f}",
                f"{r['train_peak_mb']:.0f}",
            )
        )
        lines.append(
            f"| {code} | {r['backbone']} | {r['batch']} | {' | '.join(train)} | {r['infer_img_s']:.2f} | "
            f"{r['infer_peak_mb']:.0f} | {r['split_backbone_s']:.3f} / {r['split_transformer_s']:.3f} / "
            f"{r['split_scoring_s']:.3f} | {r['backbone_gflop']:.2f} + {r['transformer_gflop']:.2f} | "
            f"{r['infer_ms_per_img']:.1f} | {r['flop_bound_ms_per_img']:.1f} | {r['infer_over_flop_bound']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "wide_resnet50_2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the level Transformers")
    parser.add_argument(
        "--score",
        choices=["default", "paper"],
        default="default",
        help="Fod's defaults (one layer, whitened residual) or the paper's model and score (3 layers, divergences)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=Path("results/speed"))
    parser.add_argument(
        "--baseline",
        type=Path,
        help="source tree of another version (e.g. a git worktree of an older commit): timed alternately with this one",
    )
    parser.add_argument(
        "--allocator",
        choices=["default", "mallopt"],
        default="default",
        help="glibc malloc as it comes, or with the mmap/trim thresholds raised (what Fod.setup did before)",
    )
    parser.add_argument("--single", nargs=2, metavar=("BACKBONE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--skip-train", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if sorted(args.batch_sizes) != args.batch_sizes:
        parser.error("--batch-sizes must be ascending (memory of larger batches is estimated from the first)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu"))
    if device.type == "cpu" and args.allocator == "mallopt":
        try:  # where the setting lives since it is opt-in; older versions (a --baseline) kept it in utils
            from anomalib_fod.allocator import keep_freed_memory_on_cpu  # noqa: PLC0415
        except ImportError:
            from anomalib_fod.utils import keep_freed_memory_on_cpu  # noqa: PLC0415

        keep_freed_memory_on_cpu()
    if args.single:
        row = bench_one(args, args.single[0], int(args.single[1]), device, args.rate)
        print(json.dumps(row))
        return 0
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rate = matmul_rate(device, dtype)
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "precision": args.precision + (" + torch.compile" if args.compile else ""),
        "matmul_gflop_s": rate / 1e9,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"matmul rate on {environment['device']}: {rate / 1e9:.0f} GFLOP/s ({args.precision})", flush=True)
    rows = []
    for backbone in args.backbones:
        per_image_mb = None
        for batch in args.batch_sizes:
            skip = ""
            available = _available_mb()
            if device.type == "cpu" and per_image_mb is not None and per_image_mb * batch > 0.8 * available:
                skip = f"needs ~{per_image_mb * batch / 1024:.1f} GiB, {available / 1024:.1f} GiB available"
            for code in [None, args.baseline] if args.baseline else [None]:  # alternately, same rate
                row = run_isolated(args, backbone, batch, rate, skip, code)
                if code is None and per_image_mb is None and row.get("train_peak_mb"):
                    per_image_mb = row["train_peak_mb"] / batch
                rows.append(row)
                print(_line(row), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "speed.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    (args.output / "speed.md").write_text(markdown(rows, environment))
    print(markdown(rows, environment))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
