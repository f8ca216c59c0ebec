"""anomalib's CLI and the plugin's ``anomalib-fod`` console script train FOD from a YAML config."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fod_helpers import DUMMY_SIZE, TEST_THREADS, TINY

from anomalib_fod import utils


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


# --------------------------------------------------------------------------- the plugin's own commands


def test_plugin_commands_take_anomalib_clis_spelling() -> None:
    """The plugin's commands parse their options as anomalib's CLI does (jsonargparse, no rewriting)."""
    from anomalib_fod import demo, explain
    from anomalib_fod.benchmark.__main__ import benchmark
    from anomalib_fod.typed_cli import function_parser

    def parse(function, argv):  # noqa: ANN001, ANN202
        return function_parser(function, "test").parse_args(argv)

    args = parse(demo.demo, ["--epochs", "1", "--image_size", "[64, 96]", "--batch_size", "2", "--output", "out"])
    assert (args.epochs, tuple(args.image_size), args.batch_size, str(args.output)) == (1, (64, 96), 2, "out")
    args = parse(benchmark, ["--config", "b.yaml", "--models", "[Fod, Patchcore]", "--force", "true", "--max_epochs", "3"])
    assert (args.models, args.force, args.max_epochs, args.datasets) == (["Fod", "Patchcore"], True, 3, None)
    args = parse(benchmark, ["--config", "b.yaml", "--datasets+=bottle", "--datasets+=screw", "--force", "false"])
    assert (args.datasets, args.force) == (["bottle", "screw"], False)
    args = parse(explain.explain, ["--checkpoint", "m.ckpt", "--image", "[a.png]", "--token", "[2, 5]"])
    assert ([str(p) for p in args.image], tuple(args.token)) == (["a.png"], (2, 5))
    assert parse(demo.demo, ["--image_size=[32, 48]"]).image_size == (32, 48)


def test_plugin_commands_report_bad_options_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_fod import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--epochs", "many"])
    assert exit_info.value.code == 2
    assert "epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in cli.PLUGIN_COMMANDS)


def test_shipped_configs_resolve_by_name_and_parse(tmp_path: Path) -> None:
    """``--config mvtec_ad`` names a YAML inside the package (so it works from a wheel); every one parses."""
    from anomalib_fod.configs import available, config_path, resolve_config_argument

    names = available()
    assert {"mvtec_ad", "fod", "fod_paper", "demo_battery_weld", "cdo_battery_weld", "folder", "btad", "mvtec3d"} <= set(names)
    resolved = resolve_config_argument(["train", "--config", "mvtec_ad", "-c=fod.yaml", "--data.category", "carpet"])
    assert resolved[2] == str(config_path("mvtec_ad")) and resolved[3] == f"-c={config_path('fod')}"
    own = tmp_path / "mvtec_ad"
    own.write_text("{}")
    assert resolve_config_argument(["--config", str(own)])[1] == str(own)  # an existing file wins
    assert resolve_config_argument(["--config", "nope"])[1] == "nope"  # anomalib reports it
    for name in names:
        config = yaml.safe_load(config_path(name).read_text())
        for section in ("model", "data"):  # both classes import (the data needs no path of a checkout)
            module, _, cls = config[section]["class_path"].rpartition(".")
            assert hasattr(importlib.import_module(module), cls), (name, section)
        assert "../" not in config_path(name).read_text()  # nothing outside the package


def test_shipped_fod_configs_give_the_recipe_they_name() -> None:
    """The default-recipe configs let FOD run its step budget; ``fod`` writes out every setting at its default;
    ``fod_paper`` is the paper's recipe."""
    import inspect

    from anomalib_fod import Fod
    from anomalib_fod.configs import config_path
    from anomalib_fod.models.base import OfflineBackboneModule

    defaults = {
        name: parameter.default
        for function in (Fod.__init__, OfflineBackboneModule.__init__)
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    for name in ("fod", "mvtec_ad", "mvtec3d", "folder", "btad"):
        config = yaml.safe_load(config_path(name).read_text())
        args = {**defaults, **config["model"]["init_args"]}
        assert (args["scoring"], args["reconstruction_term"]) == ("rec", "mahalanobis"), name
        assert config["trainer"]["max_epochs"] >= args["training_steps"], name  # epochs never stop it first
    written = yaml.safe_load(config_path("fod").read_text())["model"]["init_args"]
    handled_apart = {"pre_processor", "post_processor", "evaluator", "visualizer"}
    assert set(written) == set(defaults) - handled_apart, "fod.yaml writes out every Fod setting"
    for name, value in written.items():
        if name != "image_size":  # None is 256x256, written out
            assert utils.plain_value(value) == utils.plain_value(defaults[name]), name
    paper = yaml.safe_load(config_path("fod_paper").read_text())["model"]["init_args"]
    assert (paper["scoring"], paper["reconstruction_term"], paper["training_steps"]) == ("rec_div", "mse_cos", 1000)
    assert paper["num_layers"] == 3  # the paper's depth: its score fell to chance with Fod's one layer
    assert paper["map_level_weights"] is None  # the paper averages the levels
    assert paper["map_align_corners"] is True  # and upsamples them corner-aligned
    assert paper["nearest_tokens"] == 0  # and keeps no bank of training tokens


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_demo_data(tmp_path: Path) -> None:
    """Build the wheel from a copy of the tracked sources and look inside it."""
    import zipfile

    from fod_helpers import REPO_ROOT

    source = tmp_path / "source"
    tracked = subprocess.run(  # noqa: S603 - git, fixed arguments
        ["git", "ls-files", "pyproject.toml", "README.md", "anomalib_fod", "configs"],  # noqa: S607
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    result = subprocess.run(  # noqa: S603 - this interpreter's pip
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("anomalib_fod-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).name for n in names if n.startswith("anomalib_fod/configs/") and n.endswith(".yaml")}
    assert shipped == {Path(n).name for n in tracked if n.startswith("configs/") and n.endswith(".yaml")}
    packages = {str(Path(n).parent) for n in tracked if n.endswith("__init__.py")}
    assert {f"anomalib_fod/{p}" if p == "configs" else p for p in packages} <= {str(Path(n).parent) for n in names}
    assert "anomalib_fod/data/battery_weld/ATTRIBUTION.md" in names
    pngs = [n for n in names if n.startswith("anomalib_fod/data/battery_weld/") and n.endswith(".png")]
    assert len(pngs) == 37 + 128 + 93  # train, test images and the defect masks


def test_module_entry_points_read_the_process_arguments(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    """``python -m anomalib_fod.benchmark.cell --spec X`` calls ``main()`` without argv: sys.argv counts."""
    from anomalib_fod.benchmark import cell

    monkeypatch.setattr(sys, "argv", ["cell", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cell.main()
    assert exit_info.value.code == 0
    assert "--spec" in capsys.readouterr().out
