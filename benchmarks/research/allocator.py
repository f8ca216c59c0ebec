"""FOD training-step time on a CPU under each memory-allocator setting (glibc default, mallopt, env, LD_PRELOAD).

    python benchmarks/research/allocator.py                          # 256x256, batch 2, 5 timed steps, 2 rounds
    python benchmarks/research/allocator.py --steps 3 --rounds 1 --image_size 128 --json_path out.json

Every setting runs in its own process (an allocator is process-wide), one after the other, and the
whole set is repeated ``--rounds`` times so a busy machine shows up as spread rather than as a
difference between settings. Each process builds the default FOD (EfficientNet-Lite0, random
weights: timing does not depend on them), gives it mean references of random images and times
``--steps`` training steps (backbone, both level Transformers forward and backward, one Adam step)
after one warm-up step, as ``benchmarks/speed.py`` does. Reported per setting: the median step time
of each round and the peak resident memory. Settings whose library is not installed are skipped.

The settings:

- ``glibc``: the default allocator. Blocks of 32 MiB and more (the stride-8 correlation maps at 256x256
  of the attention before it ran in query blocks) are served with ``mmap`` and unmapped on ``free``, so
  every new map page-faulted in again.
- ``mallopt``: :func:`anomalib_fod.allocator.keep_freed_memory_on_cpu` (mmap and trim thresholds raised to
  1 GiB), which the plugin once applied by itself and now only applies when asked.
- ``env``: the same thresholds through glibc's environment variables
  ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824``: no code involved.
- ``jemalloc`` / ``tcmalloc``: ``LD_PRELOAD`` of ``libjemalloc.so.2`` / ``libtcmalloc_minimal.so.4``
  (Debian/Ubuntu packages ``libjemalloc2`` / ``libtcmalloc-minimal4``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

LIBRARY_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib"))
THRESHOLD = str(1 << 30)
SETTINGS: dict[str, dict[str, str]] = {
    "glibc": {},
    "mallopt": {},
    "env": {"MALLOC_MMAP_THRESHOLD_": THRESHOLD, "MALLOC_TRIM_THRESHOLD_": THRESHOLD},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
}


def _library(name: str) -> Path | None:
    return next((folder / name for folder in LIBRARY_DIRS if (folder / name).is_file()), None)


def _environment(setting: str) -> dict[str, str] | None:
    """The child's environment for ``setting``; ``None`` when its library is missing."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    extra = dict(SETTINGS[setting])
    if "LD_PRELOAD" in extra:
        library = _library(extra["LD_PRELOAD"])
        if library is None:
            return None
        extra["LD_PRELOAD"] = str(library)
    return {**env, **extra}


def time_steps(setting: str, image_size: int, batch: int, steps: int) -> dict[str, float]:
    """Median training-step time and peak RSS in this process (run as the child of :func:`main`)."""
    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415

    if setting == "mallopt":
        from anomalib_fod.allocator import keep_freed_memory_on_cpu  # noqa: PLC0415

        if not keep_freed_memory_on_cpu():
            msg = "mallopt refused the thresholds"
            raise RuntimeError(msg)
    torch.manual_seed(0)
    model = Fod(pre_trained=False, image_size=image_size, visualizer=False)
    fod = model.model
    images = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        fod.set_mean_reference([f.mean(dim=0) for f in fod.extract_features(images)])
    optimizer = torch.optim.Adam([p for p in fod.parameters() if p.requires_grad], lr=1e-4)
    fod.train()

    def step() -> None:
        output = fod.forward_features(fod.extract_features(images))
        loss, _ = model.loss(output.tokens, output.levels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    done.set()
    sampler.join()
    return {"step_s": statistics.median(times), "steps": times, "peak_rss_mb": peak[0] / 2**20}


def allocator_benchmark(
    image_size: int = 256,
    batch: int = 2,
    steps: int = 5,
    rounds: int = 2,
    settings: list[str] | None = None,
    json_path: Path | None = None,
    child: str | None = None,
) -> int:
    """Time FOD training steps under each allocator setting, each in its own process; print a Markdown table.

    Args:
        image_size: input side in pixels.
        batch: training batch size.
        steps: timed steps per process (after one warm-up step).
        rounds: how often the whole set of settings runs.
        settings: which settings (default: all of glibc, mallopt, env, jemalloc, tcmalloc).
        json_path: also write the measurements here.
        child: internal: time this one setting in this process and print its JSON row.
    """
    if child is not None:
        print(json.dumps(time_steps(child, image_size, batch, steps)))
        return 0
    chosen = settings or list(SETTINGS)
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        print(f"unknown settings {unknown}; choose from {list(SETTINGS)}", file=sys.stderr)
        return 2
    results: dict[str, list[dict[str, float]]] = {setting: [] for setting in chosen}
    for round_index in range(rounds):
        for setting in chosen:
            env = _environment(setting)
            if env is None:
                print(f"round {round_index + 1}: {setting}: library not installed, skipped", flush=True)
                continue
            command = [sys.executable, __file__, "--child", setting, "--image_size", str(image_size)]
            command += ["--batch", str(batch), "--steps", str(steps)]
            process = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
            if process.returncode != 0:
                print(f"round {round_index + 1}: {setting} failed:\n{process.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(process.stdout.strip().splitlines()[-1])
            results[setting].append(row)
            print(f"round {round_index + 1}: {setting}: {row['step_s']:.2f} s/step, {row['peak_rss_mb']:.0f} MB", flush=True)

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\nFOD training step, {image_size}x{image_size}, batch {batch}, {threads} OMP threads, median of {steps} steps per round\n")
    print("| allocator | s/step per round | peak RSS MB |")
    print("|---|---|---|")
    for setting, rows in results.items():
        if rows:
            per_round = ", ".join(f"{row['step_s']:.2f}" for row in rows)
            print(f"| {setting} | {per_round} | {max(row['peak_rss_mb'] for row in rows):.0f} |")
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line (jsonargparse, e.g. ``--steps 3 --settings "[glibc, tcmalloc]"``)."""
    from anomalib_fod.typed_cli import run_function  # noqa: PLC0415

    return run_function(allocator_benchmark, argv, prog="benchmarks/research/allocator.py")


if __name__ == "__main__":
    sys.exit(main())
