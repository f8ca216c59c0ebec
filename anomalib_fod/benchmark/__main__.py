"""``python -m anomalib_fod.benchmark`` / ``anomalib-fod benchmark``: the side-by-side benchmark.

Examples:
    anomalib-fod benchmark --config benchmarks/bottle.yaml            # run or resume
    anomalib-fod benchmark --config benchmarks/bottle.yaml --force true    # recompute every cell
    anomalib-fod benchmark --config benchmarks/bottle.yaml --models "[Fod, Patchcore]"   # only these models
    anomalib-fod benchmark --config benchmarks/bottle.yaml --seeds 0     # only this seed (also --datasets)
    anomalib-fod benchmark --anomalib_config my_anomalib_benchmark.yaml --max_epochs 10
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def benchmark(
    config: Path | None = None,
    anomalib_config: Path | None = None,
    output: Path | None = None,
    force: bool = False,
    models: list[str] | str | None = None,
    datasets: list[str] | str | None = None,
    seeds: list[int] | int | None = None,
    max_epochs: int | None = None,
) -> int:
    """Benchmark FOD next to anomalib's models: same data, image size, backbone and layers.

    Exact metrics on raw scores, anomalib's metrics and training/inference cost per dataset x model x
    seed. Finished cells are skipped on a rerun; a cell killed during training resumes from its last
    epoch.

    Args:
        config: harness config (see benchmarks/*.yaml).
        anomalib_config: instead: run anomalib's own `anomalib benchmark` pipeline on this config, with
            the plugin's models registered.
        output: run folder (default: the config's output_dir).
        force: recompute cells that already finished.
        models: run only these models of the config, one name or a list (the report still shows all).
        datasets: run only these datasets of the config, one name or a list.
        seeds: run only these seeds of the config, one or a list.
        max_epochs: with anomalib_config: epochs for models that do not fix their own (sets
            PL_TRAINER_MAX_EPOCHS).

    Returns:
        0 when every cell finished, 1 when some failed, 2 for a usage or config error.
    """
    if (config is None) == (anomalib_config is None):
        print("error: give exactly one of --config and --anomalib_config.", file=sys.stderr)
        return 2
    if anomalib_config is not None:
        from .anomalib_pipeline import run_anomalib_benchmark  # noqa: PLC0415

        run_anomalib_benchmark(anomalib_config, max_epochs=max_epochs)
        return 0
    if max_epochs is not None:
        print("--max_epochs only applies to --anomalib_config; set max_epochs per model.", file=sys.stderr)
        return 2

    models = [models] if isinstance(models, str) else models
    datasets = [datasets] if isinstance(datasets, str) else datasets
    seeds = [seeds] if isinstance(seeds, int) else seeds
    from .config import BenchmarkConfigError, load_config, resolve_path  # noqa: PLC0415
    from .runner import run_benchmark  # noqa: PLC0415

    try:
        settings = load_config(config)
    except BenchmarkConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = Path(resolve_path(output if output is not None else settings.output_dir))
    try:
        results = run_benchmark(settings, run_dir, force=force, models=models, datasets=datasets, seeds=seeds)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(r.get("status") == "ok" for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalib-fod benchmark`` with command-line ``argv``; returns the exit status."""
    from anomalib_fod.cli import run_command  # noqa: PLC0415

    return run_command("benchmark", argv)


if __name__ == "__main__":
    sys.exit(main())
