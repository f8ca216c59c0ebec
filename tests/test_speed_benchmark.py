"""``benchmarks/speed.py`` runs end to end and reports consistent figures (tiny size, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_reports_every_figure(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "speed.py"),
        "--backbones",
        "tf_efficientnet_lite0",
        "--batch-sizes",
        "1",
        "2",
        "--image-size",
        "64",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--output",
        str(tmp_path),
        "--baseline",  # the mechanism for timing an older checkout alternately; here the same tree
        str(ROOT),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)  # noqa: S603
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    rows = report["rows"]
    assert [row["batch"] for row in rows] == [1, 1, 2, 2]
    assert [row["code"] for row in rows] == ["current", f"baseline ({ROOT.name})"] * 2
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and row["train_cached_img_s"] > 0
        assert row["train_peak_mb"] > 0
        # Lite0 at 64 px: a few tens of MFLOP for the backbone, the Transformers dominate.
        assert 0.01 < row["backbone_gflop"] < row["transformer_gflop"]
        assert row["flop_bound_ms_per_img"] == pytest.approx(
            (row["backbone_gflop"] + row["transformer_gflop"]) * 1e3 / report["environment"]["matmul_gflop_s"]
        )
        assert row["infer_over_flop_bound"] > 1.0, "faster than the FLOP bound: the FLOP count or the rate is wrong"
        bound_s = 3 * (row["backbone_gflop"] + row["transformer_gflop"]) / report["environment"]["matmul_gflop_s"]
        assert row["train_over_flop_bound"] == pytest.approx(1 / row["train_img_s"] / bound_s)
    # The FLOP count is the model's arithmetic, whichever attention path ran: the same for both rows.
    assert rows[0]["transformer_gflop"] == pytest.approx(rows[1]["transformer_gflop"])
    assert "| current | tf_efficientnet_lite0 | 2 |" in (tmp_path / "speed.md").read_text()
