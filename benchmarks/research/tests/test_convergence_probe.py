"""``benchmarks/research/convergence_probe.py``: settings reach the model, every requested step is scored."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/research
TINY_SETTINGS = ["d_models=[32, 64]", "num_heads=2", "num_layers=1"]


def _load_script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("convergence_probe", ROOT / "convergence_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, dummy_dataset: Path, out: Path, *extra: str) -> dict:  # noqa: ANN001
    argv = ["--root", str(dummy_dataset.parent), "--category", dummy_dataset.name, "--image-size", "64", "64"]
    argv += ["--batch", "3", "--eval-at", "0,2", "--json", str(out)]
    for setting in [*TINY_SETTINGS, *extra]:
        argv += ["--set", setting]
    assert script.main(argv) == 0
    return json.loads(out.read_text())


def test_probe_scores_each_step_and_applies_settings(dummy_dataset: Path, tmp_path: Path) -> None:
    script = _load_script()
    default = _run(script, dummy_dataset, tmp_path / "default.json")
    assert [r["step"] for r in default["results"]] == [0, 2]
    assert [r["images_seen"] for r in default["results"]] == [0, 6]
    for row in default["results"]:
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
    assert not math.isclose(default["results"][0]["pixel_auroc"], default["results"][1]["pixel_auroc"])
    # The default has no attention output projection (as the paper's code); the setting adds
    # one d x d linear per attention: 2 attentions x 1 layer on levels of width 32 and 64.
    with_projection = _run(script, dummy_dataset, tmp_path / "proj.json", "out_projection=true")
    added = with_projection["trainable_parameters"] - default["trainable_parameters"]
    assert added == 2 * (32 * 32 + 32) + 2 * (64 * 64 + 64)


@pytest.mark.parametrize(
    "bad",
    [["--set", "no_such_setting=1"], ["--set", "missing-equals"], ["--set", "reference=coreset"]],
    ids=["unknown-setting", "not-key-value", "coreset"],
)
def test_probe_rejects_bad_settings(dummy_dataset: Path, bad: list[str]) -> None:
    script = _load_script()
    argv = ["--root", str(dummy_dataset.parent), "--category", dummy_dataset.name, "--eval-at", "1", *bad]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
