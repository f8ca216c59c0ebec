"""Re-score a harness run's trained FOD checkpoints with other scoring settings, without retraining.

FOD's scoring settings (``reconstruction_term``, ``residual_covariance``, ``image_score``, ``intensity_gains``,
``blur_sigma``) act after training: the residual statistics are refitted on the training images with the
variant's settings, then the test set is predicted as the harness does (``Engine.predict``, raw scores) and
scored exactly. Each variant is scored on the same trained weights, so differences between variants are the
scoring's alone. Training images only are used to fit; the test labels only to measure.

    python benchmarks/research/rescore.py --harness benchmarks/shared_datasets_256.yaml --model Fod --datasets "[battery_weld]" \
        --variants '{"gains 1": {"intensity_gains": [1.0]}, "gains 0.9-1.1": {"intensity_gains": [0.9, 1.0, 1.1]}}'

One JSON line per checkpoint and variant goes to ``--out`` (appended; rows already there are skipped, so a
killed run resumes), and a table of mean and spread over seeds is printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def main(
    harness: Path = Path("benchmarks/shared_datasets_256.yaml"),
    variants: dict[str, dict[str, Any]] | None = None,
    model: str = "Fod",
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    run: Path | None = None,
    out: Path | None = None,
    threads: int = 1,
) -> None:
    """Re-score the checkpoint of every finished ``<dataset>__<model>__seed<k>`` harness cell with each variant.

    Args:
        harness: the harness config the run was made with (its datasets are rebuilt from it).
        variants: name -> keyword arguments of ``Fod.load_from_checkpoint`` (scoring settings), and optionally
            ``keep_share``: the share of the training images whose tokens the nearest-token fit keeps (as where all
            of them would not fit in memory).
        model: the harness model name whose cells are re-scored.
        datasets: dataset names (default: every dataset of the config with checkpoints).
        seeds: seeds whose checkpoints are re-scored (default: all).
        run: the harness run folder (default: the config's ``output_dir``).
        out: JSON-lines file of the results (default: ``<run>/rescore.jsonl``).
        threads: torch threads.
    """
    import torch  # noqa: PLC0415

    from anomalib_fod.benchmark.data import build_datamodule  # noqa: PLC0415
    from anomalib_fod.evaluation import exact_metrics  # noqa: PLC0415

    if not variants:
        msg = 'give --variants, e.g. \'{"as before": {"intensity_gains": [1.0]}}\''
        raise SystemExit(msg)
    torch.set_num_threads(threads)
    specs, run, out, done = open_run(harness, run, out, "rescore.jsonl")
    for dataset, seed, checkpoint in finished_cells(run, model, datasets or list(specs), seeds):
        datamodule = build_datamodule(specs[dataset])
        datamodule.setup()
        fitted: dict[str, Any] = {}
        with_fine: dict[str, Any] = {}
        for name, settings in variants.items():
            if (dataset, seed, name) in done:
                continue
            start = time.perf_counter()
            model_settings = {key: value for key, value in settings.items() if key != "keep_share"}
            # The blur acts after the statistics: variants that differ only in the blur they set share one fit (one
            # that sets none keeps the checkpoint's own blur and is fitted alone).
            fit_key = json.dumps({k: v for k, v in settings.items() if k != "blur_sigma"}, sort_keys=True)
            # The fine map level adds to the map after everything else is fitted: a variant that sets
            # fine_map_weight=0 takes an earlier variant's fit with it (otherwise the same settings), switched off.
            fine_key = json.dumps({k: v for k, v in settings.items() if k != "fine_map_weight"}, sort_keys=True)
            if settings.get("fine_map_weight") == 0 and fine_key in with_fine:
                fod = without_fine(with_fine.pop(fine_key))
            elif "blur_sigma" in settings and fit_key in fitted:
                fod = fitted[fit_key]
                with_blur(fod, settings["blur_sigma"])
            else:
                fod = load_seeded(checkpoint, seed, **model_settings)
                with kept_share(settings.get("keep_share")):
                    fod.fit_residual_statistics(datamodule)
                if "blur_sigma" in settings:
                    fitted[fit_key] = fod
                elif settings.get("fine_map_weight"):
                    with_fine[fine_key] = fod
            fit_s = time.perf_counter() - start
            raw = predict_raw(fod, datamodule)
            metrics = exact_metrics(raw["scores"], raw["labels"], raw["maps"], raw["masks"])
            row = {"dataset": dataset, "seed": seed, "variant": name, "settings": settings, "fit_s": fit_s, **metrics}
            aligned = fod.model.anomaly_map_generator.aligned
            if aligned is not None and aligned.position_share.numel():  # what decided the aligned map level
                row["aligned_share"] = round(float(aligned.position_share), 4)
            print(json.dumps(row), flush=True)
            with out.open("a") as file:
                file.write(json.dumps(row) + "\n")
    table(out, variants)


def load_seeded(checkpoint: Path, seed: int, **settings: Any) -> Any:  # noqa: ANN401
    """``Fod.load_from_checkpoint`` whose refits draw from ``seed`` (the cell's) where the checkpoint predates the run's
    draw seed: its nearest-token folds and banks would otherwise be drawn from the process's own seed, a different
    draw in every process (battery_weld's 256 px map moved by 0.006 pixel AUROC between two such refits)."""
    from anomalib_fod import Fod  # noqa: PLC0415

    fod = Fod.load_from_checkpoint(checkpoint, **settings)
    if fod.draw_seed is None:
        fod.draw_seed = seed
    return fod


def without_fine(fod: Any) -> Any:  # noqa: ANN401
    """``fod`` with its fine map level switched off: it then scores as a model fitted without one."""
    fod.model.anomaly_map_generator.fine = None
    return fod


def with_blur(fod: Any, sigma: float) -> None:  # noqa: ANN401
    """Blur ``fod``'s maps (the anomaly map and the image score's map) at ``sigma`` from now on (0: none)."""
    from anomalib_fod.models.blur import gaussian_blur  # noqa: PLC0415

    fod.model.anomaly_map_generator.blur = gaussian_blur(sigma)


@contextlib.contextmanager
def kept_share(share: float | None) -> Iterator[None]:
    """Within the block, the nearest-token fit keeps the tokens of a random ``share`` of the training images, as it
    does where all of them would not fit in memory (None: as the memory budget decides)."""
    from anomalib_fod.models.fod import lightning_model  # noqa: PLC0415

    if share is None:
        yield
        return
    original = lightning_model.kept_token_share
    lightning_model.kept_token_share = lambda *_: float(share)
    try:
        yield
    finally:
        lightning_model.kept_token_share = original


def open_run(harness: Path, run: Path | None, out: Path | None, name: str) -> tuple[dict[str, Any], Path, Path, set]:
    """The harness config's datasets by name, the run folder, the results file (default ``<run>/<name>``) and the
    ``(dataset, seed, variant)`` rows it already holds (skipped: a killed run resumes)."""
    from anomalib_fod.benchmark.config import load_config  # noqa: PLC0415

    spec = load_config(harness)
    run = Path(run or spec.output_dir)
    out = Path(out or run / name)
    done = set()
    if out.exists():  # a variant is a name, or (one-cell scripts) the settings themselves: keyed as sorted JSON
        done = {(r["dataset"], r["seed"], r["variant"] if isinstance(r["variant"], str)
                 else json.dumps(r["variant"], sort_keys=True)) for r in map(json.loads, out.read_text().splitlines())}
    return {dataset.name: dataset for dataset in spec.datasets}, run, out, done


def one_cell(harness: Path, run: Path | None, out: Path | None, name: str, model: str, dataset: str,
             seed: int) -> tuple[Path, Any, Path]:
    """The checkpoint of one finished harness cell, its dataset's datamodule (set up) and the results file
    (default ``<run>/<name>``): what a script measuring one cell starts from."""
    from anomalib_fod.benchmark.data import build_datamodule  # noqa: PLC0415

    specs, run, out, _ = open_run(harness, run, out, name)
    [(_, _, checkpoint)] = finished_cells(run, model, [dataset], [seed])
    datamodule = build_datamodule(specs[dataset])
    datamodule.setup()
    return checkpoint, datamodule, out


def predict_raw(fod: Any, datamodule: Any) -> dict[str, Any]:  # noqa: ANN401
    """The test set's raw (un-normalised) predictions, as the harness makes them (``Engine.predict``)."""
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_fod.evaluation import collect_predictions, raw_post_processing  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as scratch, raw_post_processing(fod):
        engine = Engine(default_root_dir=scratch, logger=False, enable_progress_bar=False, devices=1)
        return collect_predictions(engine.predict(fod, datamodule=datamodule, return_predictions=True))


def finished_cells(run: Path, model: str, datasets: list[str], seeds: list[int] | None) -> list[tuple[str, int, Path]]:
    """``(dataset, seed, checkpoint)`` of every finished ``<dataset>__<model>__seed<k>`` cell of a harness run."""
    pattern = re.compile(rf"(?P<dataset>.+)__{re.escape(model)}__seed(?P<seed>\d+)\.json$")
    records = {match: json.loads(path.read_text()) for path in (run / "cells").glob("*.json")
               if (match := pattern.match(path.name))}
    cells = sorted(
        (match["dataset"], int(match["seed"]), Path(record["checkpoint"]))
        for match, record in records.items()
        if record.get("status") == "ok" and match["dataset"] in datasets
    )
    cells = [cell for cell in cells if seeds is None or cell[1] in seeds]
    if not cells:
        msg = f"no finished {model} cells of {datasets} under {run / 'cells'}"
        raise SystemExit(msg)
    return cells


def table(path: Path, variants: dict[str, dict[str, Any]]) -> None:
    """Print image / pixel AUROC, mean ± spread over seeds, per variant (rows) and dataset (columns)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    names = list(dict.fromkeys(row["dataset"] for row in rows))
    print("| variant | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for variant in variants:
        cells = []
        for dataset in names:
            picked = [row for row in rows if row["dataset"] == dataset and row["variant"] == variant]
            cells.append(" / ".join(_spread([row[key] for row in picked]) for key in ("image_auroc", "pixel_auroc")))
        print(f"| {variant} | " + " | ".join(cells) + " |")


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f} ({len(values)})"


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
