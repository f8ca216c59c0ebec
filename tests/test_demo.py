"""``anomalib-fod demo``, the README's main command, end to end on the embedded data (shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_fod import demo


@pytest.mark.slow
def test_demo_trains_tests_and_writes_heat_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = demo.build_parser().parse_args(["--epochs", "1", "--image-size", "64", "96", "--output", str(tmp_path)])
    assert args.batch_size == 1  # the default: FOD needs optimizer steps more than large batches
    result = demo.run(args)
    for key in ("image_auroc", "pixel_auroc"):
        assert 0.0 <= result[key] <= 1.0
    printed = capsys.readouterr().out
    assert f"image AUROC  {result['image_auroc']:.4f} (exact, raw scores)" in printed
    heat_maps = list(tmp_path.rglob("images/**/*.png"))
    assert len(heat_maps) == 128  # every test image of battery_weld (35 good + 93 defective)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    assert str(checkpoints[0].resolve()) in printed
