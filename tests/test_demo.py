"""``anomalib-fod demo``, the README's main command, end to end on the embedded data (shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_fod import demo


@pytest.mark.slow
def test_demo_trains_tests_and_writes_heat_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 3 epochs at 64x96 (111 steps, ~30 s of fitting): enough to separate defects, unlike one epoch (0.27).
    result = demo.demo(epochs=3, image_size=(64, 96), output=tmp_path)
    assert result["image_auroc"] > 0.65  # seed 0 on a CPU: 0.78  # noqa: PLR2004
    printed = capsys.readouterr().out
    assert f"image AUROC  {result['image_auroc']:.4f} (exact, raw scores)" in printed
    assert "93 defective / 35 good test images" in printed
    heat_maps = list(tmp_path.rglob("images/**/*.png"))
    assert len(heat_maps) == 128  # every test image of battery_weld (35 good + 93 defective)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    assert str(checkpoints[0].resolve()) in printed
