"""``benchmarks/research/screen_report.py``: seeds pooled per candidate, runs with other model settings kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from screen_report import main  # noqa: E402


def _run(folder: Path, settings: list[str], aurocs: list[float]) -> Path:
    folder.mkdir()
    rows = [
        {"dataset": "weld", "seed": seed, "step": 250, "weights": "raw", "candidate": "maha_r",
         "settings": settings, "image_auroc": auroc, "pixel_auroc": 0.5}
        for seed, auroc in enumerate(aurocs)
    ]
    rows += [{"dataset": "weld", "seed": seed, "final": True, "train_seconds": 10.0} for seed in range(len(aurocs))]
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_settings_are_reported_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = _run(tmp_path / "plain", [], [0.90, 0.92, 0.94])
    shallow = _run(tmp_path / "shallow", ["num_layers=1"], [0.80, 0.80])
    assert main([str(plain), str(shallow), "--steps", "250"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| 250 | raw | maha_r | 0.9200 ± 0.0200 (3) | 0.5000 ± 0.0000 (3) |" in lines
    assert "| 250 | raw | maha_r [num_layers=1] | 0.8000 ± 0.0000 (2) | 0.5000 ± 0.0000 (2) |" in lines


def test_a_seed_found_in_two_pooled_folders_counts_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run(tmp_path / "first", [], [0.90, 0.94])
    merged = _run(tmp_path / "merged", [], [0.90, 0.94, 0.98])  # a copy of the first two seeds and a third
    assert main([str(first), str(merged)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| 250 | raw | maha_r | 0.9400 ± 0.0400 (3) | 0.5000 ± 0.0000 (3) |" in lines
