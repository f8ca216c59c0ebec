"""``python -m anomalib_fod.benchmark`` / ``anomalib-fod benchmark``: the side-by-side benchmark.

Examples:
    anomalib-fod benchmark --config benchmarks/bottle.yaml            # run or resume
    anomalib-fod benchmark --config benchmarks/bottle.yaml --force    # recompute every cell
    anomalib-fod benchmark --config benchmarks/bottle.yaml --models Fod Patchcore   # only these models
    anomalib-fod benchmark --anomalib-config my_anomalib_benchmark.yaml --max-epochs 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="anomalib-fod benchmark",
        description=(
            "Benchmark FOD next to anomalib's models (same data, image size, backbone and layers): exact "
            "metrics on raw scores, anomalib's metrics, training/inference cost. Finished cells are skipped "
            "on a rerun."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="harness config (see benchmarks/*.yaml)")
    source.add_argument(
        "--anomalib-config",
        type=Path,
        help="instead: run anomalib's own `anomalib benchmark` pipeline on this config, with Fod registered",
    )
    parser.add_argument("--output", type=Path, help="run folder (default: the config's output_dir)")
    parser.add_argument("--force", action="store_true", help="recompute cells that already finished")
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", help="run only these models of the config (the report still shows all)"
    )
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="run only these datasets of the config")
    parser.add_argument(
        "--max-epochs",
        type=int,
        help="with --anomalib-config: epochs for models that do not fix their own (sets PL_TRAINER_MAX_EPOCHS)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when every cell finished, 1 when some failed."""
    args = build_parser().parse_args(argv)
    if args.anomalib_config is not None:
        from .anomalib_pipeline import run_anomalib_benchmark  # noqa: PLC0415

        run_anomalib_benchmark(args.anomalib_config, max_epochs=args.max_epochs)
        return 0
    if args.max_epochs is not None:
        print("--max-epochs only applies to --anomalib-config; set max_epochs per model.", file=sys.stderr)
        return 2

    from .config import BenchmarkConfigError, load_config, resolve_path  # noqa: PLC0415
    from .runner import run_benchmark  # noqa: PLC0415

    try:
        config = load_config(args.config)
    except BenchmarkConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = Path(resolve_path(args.output if args.output is not None else config.output_dir))
    try:
        results = run_benchmark(config, run_dir, force=args.force, models=args.models, datasets=args.datasets)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
