"""anomalib's CLI and the plugin's ``anomalib-fod`` console script train FOD from a YAML config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fod_helpers import DUMMY_SIZE, TEST_THREADS, TINY


def executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"console script '{name}' is not installed")
    return found


def write_config(tmp_path: Path, dataset: Path, model_class: str) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
        },
        "model": {
            "class_path": model_class,
            "init_args": {
                **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                "visualizer": False,
                # 64 px instead of the default 256: Resize + ImageNet Normalize, both checkpoint-safe
                "pre_processor": {
                    "class_path": "anomalib.pre_processing.PreProcessor",
                    "init_args": {
                        "transform": {
                            "class_path": "torchvision.transforms.v2.Compose",
                            "init_args": {
                                "transforms": [
                                    {
                                        "class_path": "torchvision.transforms.v2.Resize",
                                        "init_args": {"size": [DUMMY_SIZE, DUMMY_SIZE]},
                                    },
                                    {
                                        "class_path": "torchvision.transforms.v2.Normalize",
                                        "init_args": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                                    },
                                ],
                            },
                        },
                    },
                },
            },
        },
        "data": {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(dataset.parent),
                "category": dataset.name,
                "train_batch_size": 4,
                "eval_batch_size": 4,
                "num_workers": 0,
            },
        },
        "default_root_dir": str(tmp_path / "results"),
    }
    path = tmp_path / "fod.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_train(command: str, config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS)}
    return subprocess.run(  # noqa: S603 - fixed executable, test-controlled arguments
        [executable(command), "train", "--config", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def check_run(result: subprocess.CompletedProcess, results_dir: Path) -> None:
    output = (result.stdout + result.stderr)[-5000:]
    assert result.returncode == 0, output
    checkpoints = list(results_dir.rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint under {results_dir}:\n{output}"
    assert all(c.stat().st_size > 0 for c in checkpoints)


@pytest.mark.slow
def test_anomalib_cli_trains_fod_by_class_path(dummy_dataset, tmp_path):
    config = write_config(tmp_path, dummy_dataset, "anomalib_fod.Fod")
    check_run(run_train("anomalib", config, tmp_path), tmp_path / "results")


@pytest.mark.slow
def test_plugin_cli_trains_fod_by_short_name(dummy_dataset, tmp_path):
    config = write_config(tmp_path, dummy_dataset, "Fod")
    result = run_train("anomalib-fod", config, tmp_path)
    check_run(result, tmp_path / "results")
    assert "image_AUROC" in result.stdout + result.stderr  # it also ran the test stage
