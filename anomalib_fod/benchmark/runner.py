"""Run every cell of a benchmark (each in its own process by default), resume, then report."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .config import BenchmarkConfig, CellSpec, expand_cells
from .data import ensure_dummy_dataset
from .jsonio import failure_record, write_json
from .resume import discard_training

logger = logging.getLogger("anomalib_fod.benchmark")
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def load_finished(cell: CellSpec) -> dict[str, Any] | None:
    """The stored result of ``cell`` if it finished with the same settings, else ``None``."""
    if not cell.result_path.is_file():
        return None
    try:
        result = json.loads(cell.result_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("status") != "ok" or result.get("fingerprint") != cell.fingerprint():
        return None
    return result


def _progress_lines(log_path: Path, offset: int) -> tuple[list[str], int]:
    """The complete ``[cell]``/``[curve]`` lines written to ``log_path`` after byte ``offset``."""
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            chunk = log.read()
    except OSError:
        return [], offset
    complete = chunk[: chunk.rfind(b"\n") + 1]
    lines = complete.decode("utf-8", errors="replace").splitlines()
    return [line for line in lines if line.startswith(("[cell]", "[curve]"))], offset + len(complete)


def run_isolated(
    cell: CellSpec,
    timeout_s: float | None,
    echo: Callable[[str], None] | None = None,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """Run ``cell`` in ``python -m anomalib_fod.benchmark.cell`` and read the JSON it writes.

    Output is appended to ``work/<cell>/cell.log`` under a header line per attempt, so a resumed cell
    keeps the log of the attempt it resumes; its progress lines (stage, each trained epoch, the test
    curve) are passed to ``echo`` as they appear, so a fit of hours is not silent. On timeout the
    whole process group of the child (its data-loader workers included) is killed and the cell is
    recorded as failed.
    """
    cell.work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = cell.work_dir / "spec.json"
    write_json(spec_path, cell.to_dict())
    log_path = cell.work_dir / "cell.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "anomalib_fod.benchmark.cell", "--spec", str(spec_path)]
    cell.error_path.unlink(missing_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"===== {stamp}: cell process started =====\n")
        log.flush()
        first_offset = log_path.stat().st_size
        # Own session: on timeout the whole group (data-loader workers included) is killed.
        process = subprocess.Popen(  # noqa: S603 - fixed command, our own interpreter
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        started, offset = time.monotonic(), first_offset
        try:
            while True:
                try:
                    code = process.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    if timeout_s is not None and time.monotonic() - started > timeout_s:
                        raise
                finally:
                    lines, offset = _progress_lines(log_path, offset)
                    for line in lines:
                        (echo or print)(f"  {line}")
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return failure_record(cell, f"timeout after {timeout_s:.0f} s (see {log_path})", "cell process")
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    finished = load_finished(cell)
    if code == 0 and finished is not None:
        return finished
    if cell.error_path.is_file():
        result = json.loads(cell.error_path.read_text(encoding="utf-8"))
        result["error"] = f"{result.get('error')} (see {log_path})"
        return result
    return failure_record(cell, f"cell process exited with code {code} without a result (see {log_path})", "cell process")


def run_in_process(cell: CellSpec) -> dict[str, Any]:
    """Run ``cell`` in this process (faster start; peak RSS then covers the whole run so far)."""
    from .cell import record_failure, run_cell  # noqa: PLC0415

    cell.error_path.unlink(missing_ok=True)
    try:
        return run_cell(cell, rss_scope="whole harness process")
    except Exception as error:  # noqa: BLE001 - one failed cell must not stop the benchmark
        logger.exception("cell %s failed", cell.cell_id)
        return record_failure(cell, error, rss_scope="whole harness process")


def _summary(result: dict[str, Any], seconds: float) -> str:
    if result.get("status") != "ok":
        return f"FAILED after {seconds:.0f} s: {result.get('error')}"
    metrics = result["metrics"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return (
        f"done in {seconds:.0f} s: image AUROC {fmt(metrics.get('image_auroc'))}, "
        f"pixel AUROC {fmt(metrics.get('pixel_auroc'))}, AUPRO {fmt(metrics.get('pixel_aupro'))}"
    )


def _file_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "benchmark.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # progress lines are echoed to stdout already
    return handler


def _check_selection(kind: str, chosen: Sequence[str] | Sequence[int] | None, known: set) -> None:
    unknown = sorted(set(chosen or ()) - known)
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; the config has {sorted(known)}")


def run_benchmark(
    config: BenchmarkConfig,
    run_dir: Path,
    force: bool = False,
    echo: Callable[[str], None] | None = None,
    models: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the cells of ``config`` under ``run_dir`` and write the report.

    Args:
        config: the validated benchmark config.
        run_dir: output folder (``cells/`` results, ``work/`` scratch, reports).
        force: recompute cells that already finished.
        echo: where progress lines go (default: ``tqdm.write`` to stdout).
        models: run only these models (names as in the config); ``None`` runs all.
        datasets: run only these datasets; ``None`` runs all.
        seeds: run only these seeds; ``None`` runs all.

    The report always covers the whole config: cells left out by ``models``/``datasets``/``seeds``
    appear with their stored results when they finished earlier (so two selections can run
    side by side, e.g. one per CPU core, and either report shows both).

    Returns:
        One record per cell that is in the report, finished or failed, in run order.
    """
    from .environment import environment  # noqa: PLC0415
    from .report import write_report  # noqa: PLC0415

    all_cells = expand_cells(config, run_dir)
    _check_selection("model", models, {cell.model.name for cell in all_cells})
    _check_selection("dataset", datasets, {cell.dataset.name for cell in all_cells})
    _check_selection("seed", seeds, {cell.seed for cell in all_cells})
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _file_logging(run_dir)

    def say(message: str) -> None:
        logger.info(message)
        (echo or (lambda m: tqdm.write(m, file=sys.stdout)))(message)

    def selected(cell: CellSpec) -> bool:
        return (
            (models is None or cell.model.name in models)
            and (datasets is None or cell.dataset.name in datasets)
            and (seeds is None or cell.seed in seeds)
        )

    cells = [cell for cell in all_cells if selected(cell)]
    left_out = [cell for cell in all_cells if not selected(cell)]
    say(f"benchmark: {len(cells)} of {len(all_cells)} cells -> {run_dir}")
    for dataset in {cell.dataset.name: cell.dataset for cell in cells}.values():
        if ensure_dummy_dataset(dataset):
            say(f"generated the synthetic dataset '{dataset.name}' under {dataset.init_args['root']}")
    results: list[dict[str, Any]] = []
    try:
        with tqdm(total=len(cells), desc="benchmark", unit="cell", file=sys.stderr, disable=None) as bar:
            for cell in cells:
                header = f"[{cell.index}/{cell.total}] {cell.label}"
                bar.set_description(header)
                finished = None if force else load_finished(cell)
                if finished is not None:
                    say(f"{header}: skipped (done)")
                    results.append(finished)
                    bar.update()
                    continue
                if force or cell.result_path.is_file():
                    # Recomputing on purpose, or for other settings: no checkpoint of it may be resumed.
                    if not force:
                        say(f"{header}: settings changed since the stored result, recomputing")
                    discard_training(cell.work_dir)
                say(f"{header}: running")
                cell.result_path.unlink(missing_ok=True)
                start = time.perf_counter()
                if config.isolate_cells:
                    result = run_isolated(cell, cell.model.timeout_s or config.cell_timeout_s, echo=say)
                else:
                    result = run_in_process(cell)
                say(f"{header}: {_summary(result, time.perf_counter() - start)}")
                results.append(result)
                bar.update()
        stored = {cell.cell_id: load_finished(cell) for cell in left_out}
        results += [result for result in stored.values() if result is not None]
        order = {cell.cell_id: cell.index for cell in all_cells}
        results.sort(key=lambda result: order[result["cell_id"]])
        paths = write_report(run_dir, results, config, environment())
        say("report: " + ", ".join(str(p) for p in paths))
    finally:
        logger.removeHandler(handler)
        handler.close()
    return results
