"""``benchmarks/results_chart.py``: the harness's chart from result rows, mean and spread over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from results_chart import main, summary_of  # noqa: E402


def write_rows(path: Path) -> None:
    rows = [
        {"dataset": dataset, "model": model, "seed": seed, "image_auroc": image, "pixel_auroc": 0.9,
         "fit_s": 10.0 * seed}
        for dataset in ("a", "b")
        for model, seed, image in (("X", 0, 0.8), ("X", 1, 0.9), ("Y", 0, 0.7), ("Z", 0, 0.5))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_summary_keeps_the_models_asked_for_in_their_order(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    write_rows(rows)
    summary = summary_of(rows, ["Y", "X"], ["b"])
    assert [(e["dataset"], e["model"]) for e in summary] == [("b", "Y"), ("b", "X")]
    x = summary[1]
    assert x["image_auroc"] == pytest.approx(0.85)
    assert x["image_auroc_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert x["fit_s"] == pytest.approx(5.0)


def test_a_model_without_rows_is_an_error_not_a_missing_bar(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    write_rows(rows)
    with pytest.raises(SystemExit, match="no rows of \\['W'\\]"):
        summary_of(rows, ["X", "W"])


def test_the_chart_is_written(tmp_path: Path) -> None:
    rows, out = tmp_path / "rows.jsonl", tmp_path / "chart.png"
    write_rows(rows)
    assert main([str(rows), "--models", "X,Y,Z", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
