"""The benchmark harness (``anomalib-fod benchmark``): metrics, config checks, a tiny end-to-end run, resume.

The end-to-end run trains a tiny FOD (1 epoch) and PatchCore on 64 px generated data in this
process (``isolate_cells: false``, no OpenVINO); the subprocess-per-cell path is covered by the
``slow`` test at the end (each cell process imports anomalib afresh).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from anomalib_fod.benchmark import BenchmarkConfigError, main, parse_config
from anomalib_fod.evaluation import aupro, exact_metrics, f1_max, image_auroc, pixel_auroc

TINY_FOD = {"d_models": [32, 64], "num_heads": 2, "num_layers": 1}


def synthetic_maps_and_masks(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Six 32x32 maps with several defect regions (two in one image, one touching a corner)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 32, 32), dtype=np.uint8)
    masks[1, 4:10, 4:12] = 1
    masks[1, 20:25, 20:30] = 1
    masks[2, 10:20, 5:8] = 1
    masks[3, 0:3, 0:3] = 1
    masks[4, 15:30, 15:17] = 1
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape) * 0.8
    return maps, masks


# --------------------------------------------------------------------------- metrics


def test_aupro_bounds_ranking_and_missing_regions() -> None:
    maps, masks = synthetic_maps_and_masks(seed=1)
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)  # perfect maps
    assert aupro(1.0 - masks.astype(float), masks) == pytest.approx(0.0)  # every normal pixel ranked first
    assert 0.0 < aupro(maps, masks) < 1.0
    assert aupro(maps, masks) == pytest.approx(aupro(maps * 7.0 - 3.0, masks), abs=1e-6)  # ranking only
    assert aupro(maps[:, None], masks[:, None]) == pytest.approx(aupro(maps, masks))  # (N, 1, H, W) too
    assert np.isnan(aupro(maps, np.zeros_like(masks)))  # no defect region


def test_aupro_of_one_region_by_hand() -> None:
    """One 2x2 defect in a 4x4 image (12 normal pixels), ranked: 2 defect pixels, 1 normal, 2 defect, the rest.

    The PRO curve goes (FPR 0, PRO 0.5) -> (1/12, 0.5) -> (1/12, 1.0) -> (1, 1.0), so its area up to
    FPR 0.3 is 0.5 * 1/12 + 1.0 * (0.3 - 1/12), divided by 0.3.
    """
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, :2, :2] = 1
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    maps[0, 0, 0] = maps[0, 0, 1] = 1.0  # two defect pixels first
    maps[0, 3, 3] = 0.9  # one normal pixel next
    maps[0, 1, 0] = maps[0, 1, 1] = 0.8  # the other two defect pixels
    expected = (0.5 * (1 / 12) + 1.0 * (0.3 - 1 / 12)) / 0.3
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(expected, abs=1e-6)


def test_f1_max_and_exact_metrics() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.5, 0.7, 0.9])
    # Best threshold 0.5: tp 3, fp 1 -> F1 = 6 / 7.
    assert f1_max(scores, labels) == pytest.approx(6 / 7)
    metrics = exact_metrics(scores, labels, maps=None, masks=None)
    assert metrics["image_auroc"] == pytest.approx(5 / 6)
    assert np.isnan(metrics["pixel_auroc"]) and np.isnan(metrics["pixel_aupro"])


def test_exact_metrics_equal_scikit_learn_on_raw_scores() -> None:
    """anomalib's AUROC and F1Max on raw, unbounded scores with ties give scikit-learn's figures (within the
    float32 rounding of torchmetrics' curves), where anomalib's AUROC on the raw values alone gives 0.5."""
    from anomalib.metrics import AUROC
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.4).astype(np.int64)
    scores = (rng.normal(30.0, 3.0, 300) + 2.0 * labels).astype(np.float32)  # Mahalanobis distances: tens
    scores[::7] = scores[0]  # ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    precision, recall, _ = precision_recall_curve(labels, scores)
    best = max(2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True) if p + r > 0)
    assert f1_max(scores, labels) == pytest.approx(best, abs=1e-6)

    masks = rng.random((4, 32, 48)) < 0.05
    maps = (rng.normal(20.0, 4.0, masks.shape) + 3.0 * masks).astype(np.float32).round(1)  # many ties
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)

    squashed = AUROC(fields=["pred_score", "gt_label"])
    squashed.update(SimpleNamespace(pred_score=torch.as_tensor(scores), gt_label=torch.as_tensor(labels)))
    assert float(squashed.compute()) == 0.5


# --------------------------------------------------------------------------- config


def _config(dataset_root: Path, run_dir: Path, **overrides: object) -> dict:
    config = {
        "output_dir": str(run_dir),
        "seeds": [0],
        "image_size": [64, 64],
        "accelerator": "cpu",
        "openvino": False,
        "isolate_cells": False,
        "inference_batch_size": 32,
        "datasets": [
            {
                "name": "dummy",
                "class_path": "anomalib.data.MVTecAD",
                "init_args": {
                    "root": str(dataset_root.parent),
                    "category": dataset_root.name,
                    "train_batch_size": 5,
                    "eval_batch_size": 4,
                    "num_workers": 0,
                },
            },
        ],
        "models": [
            {"name": "Fod", "class_path": "anomalib_fod.Fod", "max_epochs": 1, "init_args": TINY_FOD},
            {
                "name": "Patchcore",
                "class_path": "anomalib.models.Patchcore",
                "init_args": {"coreset_sampling_ratio": 0.1},
            },
        ],
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["models"][1]["init_args"].update(backbone="resnet18"), "shared by every model"),
        (lambda c: c["datasets"][0]["init_args"].update(val_split_mode="from_test"), "same_as_test"),
        (lambda c: c["models"].append(dict(c["models"][0])), "duplicate model names"),
        (lambda c: c.update(epochs=3), "'epochs' is not accepted"),
        (lambda c: c["models"][0].update(max_epochs="two"), r"models\[0\].*max_epochs"),
        (lambda c: c["models"][0].update(max_epochs=0), "max_epochs must be"),
        (lambda c: c.update(image_size=[16, 16]), "image_size"),
        (lambda c: c.update(datasets=[]), "datasets must be a non-empty list"),
        (lambda c: c["models"][0].update(train_batch_size=0), "train_batch_size must be"),
    ],
)
def test_config_errors(tmp_path: Path, change, message: str) -> None:  # noqa: ANN001
    config = _config(tmp_path / "data" / "dummy", tmp_path / "run")
    change(config)
    with pytest.raises(BenchmarkConfigError, match=message):
        parse_config(config)


def test_fingerprints_of_stored_results_stay_valid() -> None:
    """Cells keep the fingerprints the harness gave them before its config became jsonargparse dataclasses.

    A changed fingerprint would make every finished cell of a stored run train again.
    """
    from anomalib_fod.benchmark.config import expand_cells

    data = {
        "seeds": [0],
        "image_size": [64, 64],
        "datasets": [{"name": "dummy", "class_path": "anomalib.data.MVTecAD", "init_args": {"root": "/data", "category": "dummy"}}],
        "models": [
            {"name": "Fod", "class_path": "anomalib_fod.Fod", "max_epochs": 2, "init_args": {"d_models": [32, 64]}},
            {"class_path": "anomalib.models.Patchcore", "test_curve": True, "layers": ["blocks.1"]},
        ],
    }
    cells = expand_cells(parse_config(data), Path("/run"))
    assert [cell.fingerprint() for cell in cells] == ["aa136528a5a0d48a", "b9a121517179514a"]  # computed by the old harness


def test_a_model_may_train_at_its_own_batch_size(tmp_path: Path) -> None:
    """A model's ``train_batch_size`` replaces the dataset's for its cells only, and counts in their fingerprint."""
    from anomalib_fod.benchmark.config import expand_cells
    from anomalib_fod.benchmark.data import build_datamodule

    dataset = tmp_path / "data" / "dummy"
    dataset.mkdir(parents=True)
    plain = expand_cells(parse_config(_config(dataset, tmp_path / "run")), tmp_path / "run")
    config = _config(dataset, tmp_path / "run")
    config["models"][1]["train_batch_size"] = 16
    own = expand_cells(parse_config(config), tmp_path / "run")
    assert own[0].fingerprint() == plain[0].fingerprint()  # the model without it: unchanged
    assert own[1].fingerprint() != plain[1].fingerprint()
    assert build_datamodule(own[0].dataset, own[0].model.train_batch_size).train_batch_size == 5
    assert build_datamodule(own[1].dataset, own[1].model.train_batch_size).train_batch_size == 16


def test_shipped_configs_parse() -> None:
    from anomalib_fod.benchmark import load_config

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    shipped = sorted([*root.glob("*.yaml"), *(root / "research").glob("*.yaml")])
    assert {p.stem for p in shipped} >= {"bottle", "battery_weld", "tiny", "ablation", "shared_datasets_256"}
    for path in shipped:
        config = load_config(path)
        assert config.backbone == "tf_efficientnet_lite0"
        assert config.layers == ("blocks.2", "blocks.4")
        assert all(d.init_args["val_split_mode"] == "same_as_test" for d in config.datasets)


# --------------------------------------------------------------------------- models


def test_offline_weights_loaded_into_anomalib_extractor() -> None:
    from anomalib_fod.backbone import FeatureExtractor
    from anomalib_fod.benchmark.models import build_model, load_imagenet_weights

    model, info = build_model(
        "anomalib.models.Patchcore",
        {"coreset_sampling_ratio": 0.1},
        "tf_efficientnet_lite0",
        ["blocks.2", "blocks.4"],
        (64, 64),
    )
    assert info["extractors"] == ["model.feature_extractor"]
    loaded = model.model.feature_extractor.feature_extractor.state_dict()
    reference = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], pre_trained=True).body.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], reference["conv_stem.weight"])
    assert torch.equal(loaded["blocks.4.0.bn1.running_mean"], reference["blocks.4.0.bn1.running_mean"])
    with pytest.raises(Exception, match="holds no anomalib TimmFeatureExtractor"):
        load_imagenet_weights(torch.nn.Linear(2, 2), "tf_efficientnet_lite0")


def test_anomalib_get_model_resolves_fod(tmp_path: Path) -> None:
    """After ``register_with_anomalib()``, anomalib's own model lookup (used by ``anomalib benchmark``) finds Fod."""
    import anomalib_fod

    anomalib_fod.register_with_anomalib()
    from anomalib.models import get_model
    from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator

    tiny = {**TINY_FOD, "pre_trained": False, "image_size": [64, 64]}
    assert isinstance(get_model({"class_path": "Fod", "init_args": tiny}), anomalib_fod.Fod)
    assert isinstance(get_model({"class_path": "anomalib.models.Fod", "init_args": tiny}), anomalib_fod.Fod)
    assert isinstance(get_model("fod", **tiny), anomalib_fod.Fod)
    assert type(get_model("ed", **tiny)) is anomalib_fod.Ed
    assert type(get_model("cdo", pre_trained=False, image_size=[64, 64])) is anomalib_fod.Cdo
    args = {
        "seed": 0,
        "model": {"class_path": "Fod", "init_args": tiny},
        "data": {"class_path": "MVTecAD", "init_args": {"root": str(tmp_path), "category": "none"}},
    }
    jobs = list(BenchmarkJobGenerator("cpu").generate_jobs(args, None))
    assert len(jobs) == 1 and isinstance(jobs[0].model, anomalib_fod.Fod)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Harness runs on 2 cells (in-process), with their stdout.

    ``--models Patchcore`` first, then the whole config (only Fod left to run), then a rerun
    (nothing left), then ``--models Fod`` whose report must still show both cells.
    """
    import contextlib
    import io

    from anomalib_fod.data.dummy import make_dummy_mvtec

    root = tmp_path_factory.mktemp("benchmark")
    dataset = make_dummy_mvtec(root / "data", category="dummy", n_train=10, n_test_good=4, n_test_bad=6, size=(64, 64))
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(_config(dataset, root / "run")), encoding="utf-8")
    cells = root / "run" / "cells"

    def run(*extra: str) -> tuple[int, str]:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["--config", str(config_path), *extra])
        return code, buffer.getvalue()

    selective = run("--models", "Patchcore")
    selective_report = json.loads((root / "run" / "results.json").read_text())
    first = run()
    first_mtimes = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    second = run()
    last = run("--models", "Fod")
    outputs, codes = [first[1], second[1], selective[1], last[1]], [first[0], second[0], selective[0], last[0]]
    return {
        "run_dir": root / "run",
        "outputs": outputs,
        "codes": codes,
        "mtimes": first_mtimes,
        "selective_report": selective_report,
        "config": config_path,
    }


def test_harness_exact_auroc_matches_sklearn(benchmark_run: dict) -> None:
    from sklearn.metrics import roc_auc_score

    run_dir = benchmark_run["run_dir"]
    assert benchmark_run["codes"][0] == 0, benchmark_run["outputs"][0]
    results = json.loads((run_dir / "results.json").read_text())
    assert [c["model"] for c in results["cells"]] == ["Fod", "Patchcore"]
    for cell in results["cells"]:
        assert cell["status"] == "ok"
        predictions = np.load(run_dir / "cells" / cell["predictions"])
        assert predictions["scores"].shape == (10,)
        expected = roc_auc_score(predictions["labels"], predictions["scores"])
        assert cell["metrics"]["image_auroc"] == pytest.approx(expected, abs=1e-6)
        for key in ("pixel_auroc", "pixel_aupro", "image_f1_max"):
            assert 0.0 <= cell["metrics"][key] <= 1.0
        cost = cell["cost"]
        assert cost["fit_s"] > 0 and cost["infer_img_s"] > 0 and cost["n_train"] == 10 and cost["epochs"] == 1
        assert cost["checkpoint_mb"] > 0 and cost["peak_rss_mb"] > 0
        assert cost["openvino_error"] == "disabled"
        assert "image_AUROC" in cell["anomalib_metrics"]
    # PatchCore's raw scores are distances, not post-processed values in [0, 1].
    patchcore = np.load(run_dir / "cells" / results["cells"][1]["predictions"])
    assert patchcore["scores"].max() > 1.0
    for name in ("results.csv", "results.md", "results.png"):
        assert (run_dir / name).stat().st_size > 0
    table = (run_dir / "results.md").read_text()
    assert "| dummy | Fod | 0 |" in table and "| dummy | Patchcore | 0 |" in table
    assert "[1/2] dummy / Fod / seed 0: running" in benchmark_run["outputs"][0]


def test_harness_model_selection(benchmark_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """``--models`` runs only those cells; every report still lists the config's finished cells."""
    first, _, selective, last = benchmark_run["outputs"]
    assert benchmark_run["codes"][2:] == [0, 0]
    assert "benchmark: 1 of 2 cells" in selective
    assert "[2/2] dummy / Patchcore / seed 0: running" in selective and "Fod" not in selective
    assert [c["model"] for c in benchmark_run["selective_report"]["cells"]] == ["Patchcore"]
    assert "[2/2] dummy / Patchcore / seed 0: skipped (done)" in first  # the whole run reused it
    assert "[1/2] dummy / Fod / seed 0: skipped (done)" in last and "Patchcore" not in last.split("report:")[0]
    assert main(["--config", str(benchmark_run["config"]), "--models", "[Fod, Cflow]"]) == 2
    assert "unknown model(s) ['Cflow']" in capsys.readouterr().err
    assert main(["--config", str(benchmark_run["config"]), "--seeds", "[0, 3]"]) == 2
    assert "unknown seed(s) [3]" in capsys.readouterr().err
    assert main(["--config", str(benchmark_run["config"]), "--seeds", "0", "--models", "Patchcore"]) == 0
    only = capsys.readouterr().out
    assert "benchmark: 1 of 2 cells" in only and "dummy / Patchcore / seed 0: skipped (done)" in only


def test_harness_rerun_skips_finished_cells(benchmark_run: dict) -> None:
    second = benchmark_run["outputs"][1]
    assert benchmark_run["codes"][1] == 0
    assert "[1/2] dummy / Fod / seed 0: skipped (done)" in second
    assert "[2/2] dummy / Patchcore / seed 0: skipped (done)" in second
    assert "running" not in second
    cells = benchmark_run["run_dir"] / "cells"
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")} == benchmark_run["mtimes"]


@pytest.mark.slow
def test_harness_cell_subprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``isolate_cells: true``: the cell runs in ``python -m anomalib_fod.benchmark.cell`` with its own peak RSS.

    Its progress lines reach the harness's output while it runs.
    """
    from anomalib_fod.data.dummy import make_dummy_mvtec

    counts = {"n_train": 6, "n_test_good": 2, "n_test_bad": 2}
    dataset = make_dummy_mvtec(tmp_path / "data", category="dummy", size=(64, 64), **counts)
    config = _config(dataset, tmp_path / "run", isolate_cells=True)
    config["models"] = config["models"][1:]  # PatchCore only: the cost is the process start-up
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # The log of an earlier, interrupted attempt must survive the rerun that resumes it.
    log_path = tmp_path / "run" / "work" / "dummy__Patchcore__seed0" / "cell.log"
    log_path.parent.mkdir(parents=True)
    log_path.write_text("[cell] dummy / Patchcore / seed 0: fit\nearlier attempt, killed\n", encoding="utf-8")
    assert main(["--config", str(config_path)]) == 0
    cell = json.loads((tmp_path / "run" / "cells" / "dummy__Patchcore__seed0.json").read_text())
    assert cell["status"] == "ok" and cell["rss_scope"] == "cell process"
    log = log_path.read_text()
    assert log.startswith("[cell] dummy / Patchcore / seed 0: fit\nearlier attempt, killed\n=====")
    assert log.count("cell process started") == 1 and log.count("[cell]") >= 5
    output = capsys.readouterr().out
    assert output.count("  [cell] dummy / Patchcore / seed 0: fit\n") == 1  # not echoed again from the old attempt
    assert "  [cell] dummy / Patchcore / seed 0: predict (raw scores)\n" in output


def test_harness_test_curve_leaves_training_unchanged(tmp_path: Path) -> None:
    """``test_curve: true`` records one point per epoch and the cell's final numbers stay bit-identical."""
    from anomalib_fod.data.dummy import make_dummy_mvtec

    # 96 px images for a 64 px model: the curve must resize as Engine.test does (antialiased), not
    # as the export transform does, or its last point would not match the cell's own metrics.
    dataset = make_dummy_mvtec(tmp_path / "data", category="dummy", n_train=10, n_test_good=4, n_test_bad=6, size=(96, 96))
    records = {}
    for curve in (False, True):
        config = _config(dataset, tmp_path / f"run_{curve}")
        config["models"] = [{**config["models"][0], "max_epochs": 2, "test_curve": curve}]
        config_path = tmp_path / f"curve_{curve}.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        assert main(["--config", str(config_path)]) == 0
        records[curve] = json.loads((tmp_path / f"run_{curve}" / "cells" / "dummy__Fod__seed0.json").read_text())
    plain, tracked = records[False], records[True]
    assert plain["test_curve"] is None
    points = tracked["test_curve"]["points"]
    assert [p["epoch"] for p in points] == [1, 2]
    assert all(0.0 <= p[key] <= 1.0 for p in points for key in ("image_auroc", "pixel_auroc", "pixel_aupro"))
    # The curve's last point scores the same final model, pre-processed the same way, as the cell's own metrics.
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert points[-1][key] == tracked["metrics"][key], key
    assert tracked["metrics"] == plain["metrics"]
    assert plain["fingerprint"] != tracked["fingerprint"]
    report = (tmp_path / "run_True" / "results.md").read_text()
    assert "### Convergence: dummy / Fod / seed 0" in report and "\n| 2 | " in report
    assert (tmp_path / "run_True" / "curves.png").stat().st_size > 0
    assert not (tmp_path / "run_False" / "curves.png").exists()
    scores = [np.load(tmp_path / f"run_{c}" / "cells" / records[c]["predictions"])["scores"] for c in (False, True)]
    np.testing.assert_array_equal(scores[0], scores[1])


def test_curve_uses_the_test_transform_not_the_export_one() -> None:
    """The curve scores images as ``Engine.test`` does (antialiased resize), not as an exported model."""
    from types import SimpleNamespace

    from anomalib_fod import Fod
    from anomalib_fod.benchmark.curve import preprocess_as_test

    model = Fod(pre_trained=False, image_size=[64, 64], visualizer=False, **TINY_FOD)
    images = torch.rand(2, 3, 96, 96)
    expected = model.pre_processor.transform(images)
    batch = preprocess_as_test(model, SimpleNamespace(image=images, gt_mask=None))
    np.testing.assert_array_equal(batch.image.numpy(), expected.numpy())
    assert not torch.allclose(model.pre_processor(images), expected, atol=1e-3)  # the export transform differs


@pytest.mark.parametrize("options", [{}, {"nearest_tokens": 200, "nearest_position_limit": 1.0}], ids=["default", "nearest"])
def test_harness_resumes_an_interrupted_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], options: dict
) -> None:
    """A cell killed after epoch 1 of 3 resumes from its per-epoch checkpoint and ends as an uninterrupted one (with
    the nearest-token score too: its random bank comes from the run's seed, not from the RNG's state)."""
    from anomalib_fod.benchmark.resume import RESUME_CHECKPOINT, CellCheckpoint, find_resume_point
    from anomalib_fod.data.dummy import make_dummy_mvtec

    dataset = make_dummy_mvtec(tmp_path / "data", category="dummy", n_train=10, n_test_good=4, n_test_bad=6, size=(64, 64))

    def write_config(name: str) -> Path:
        config = _config(dataset, tmp_path / name)
        model = config["models"][0]
        config["models"] = [{**model, "max_epochs": 3, "test_curve": True, "init_args": {**model["init_args"], **options}}]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    def record(name: str) -> dict:
        return json.loads((tmp_path / name / "cells" / "dummy__Fod__seed0.json").read_text())

    assert main(["--config", str(write_config("straight"))]) == 0
    straight = record("straight")
    assert straight["resumed"] is None

    save_epoch = CellCheckpoint.on_train_epoch_end

    def killed_after_first_epoch(self: CellCheckpoint, trainer, pl_module) -> None:  # noqa: ANN001
        save_epoch(self, trainer, pl_module)
        raise RuntimeError("killed")

    config_path = write_config("interrupted")
    work_dir = tmp_path / "interrupted" / "work" / "dummy__Fod__seed0"
    with monkeypatch.context() as patch:
        patch.setattr(CellCheckpoint, "on_train_epoch_end", killed_after_first_epoch)
        main(["--config", str(config_path)])
    error = json.loads((tmp_path / "interrupted" / "cells" / "dummy__Fod__seed0.error.json").read_text())
    assert "killed" in error["error"]
    assert (work_dir / RESUME_CHECKPOINT).is_file()
    assert find_resume_point(work_dir, "other settings", {}) is None

    capsys.readouterr()
    assert main(["--config", str(config_path)]) == 0
    log = capsys.readouterr().out
    assert "fit, resumed after 1 epochs" in log
    assert "[cell] epoch 1/3" not in log and "[cell] epoch 3/3 trained" in log
    resumed = record("interrupted")
    assert resumed["resumed"]["epochs_done"] == 1 and not resumed["resumed"]["adopted"]
    assert resumed["resumed"]["fit_s_before"] > 0
    # This process's training is part of the whole; neither counts the curve's evaluations.
    assert 0 < resumed["cost"]["fit_s_this_process"] <= resumed["cost"]["fit_s"]
    assert resumed["cost"]["epochs"] == 3
    # Same batches, same weights: bit-identical numbers and curve, the first point from the checkpoint.
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["test_curve"]["points"] == straight["test_curve"]["points"]
    scores = [np.load(tmp_path / name / "cells" / "dummy__Fod__seed0.npz")["scores"] for name in ("straight", "interrupted")]
    np.testing.assert_array_equal(scores[0], scores[1])
    assert not (work_dir / RESUME_CHECKPOINT).exists()  # a finished cell keeps only the engine's checkpoint
    report = (tmp_path / "interrupted" / "results.md").read_text()
    assert "## Resumed cells" in report and "dummy / Fod / seed 0: resumed after 1 epoch(s)" in report

    # The finished fit's own checkpoint carries the fingerprint; --force must not reuse it.
    assert main(["--config", str(config_path), "--force", "true"]) == 0
    assert record("interrupted")["resumed"] is None


def test_resume_adopts_only_matching_legacy_checkpoints(tmp_path: Path) -> None:
    """A checkpoint without a cell fingerprint is adopted only if its hyper-parameters match; its fit time is unknown."""
    from anomalib_fod.benchmark.resume import find_resume_point

    lightning_dir = tmp_path / "engine" / "Fod" / "MVTecAD" / "dummy" / "v0" / "weights" / "lightning"
    lightning_dir.mkdir(parents=True)
    checkpoint = {
        "epoch": 4,
        "global_step": 50,
        "hyper_parameters": {"num_layers": 3, "d_models": [256, 512], "fusion": "subtract"},
        "callbacks": {},
        "loops": {
            "fit_loop": {
                "epoch_progress": {"current": {"processed": 4, "completed": 4}},
                "epoch_loop.batch_progress": {"is_last_batch": True},
            },
        },
    }
    torch.save(checkpoint, lightning_dir / "model.ckpt")
    hparams = {"num_layers": 3, "d_models": (256, 512), "fusion": "subtract"}
    point = find_resume_point(tmp_path, "abc", hparams)
    assert point is not None and point.adopted and point.fit_s_before is None
    assert (point.global_step, point.epochs_done) == (50, 5)
    assert find_resume_point(tmp_path, "abc", {**hparams, "fusion": "concat_mlp"}) is None


def test_a_self_stopping_fod_cell_validates_so_anomalib_learns_its_thresholds(dummy_dataset, tmp_path) -> None:  # noqa: ANN001
    """A cell plans 1000 epochs and validates once after the last; Fod stops itself after ``training_steps``, in an
    epoch validation is not due in, and moves validation there, or anomalib's thresholds would stay NaN."""
    from fod_helpers import DUMMY_SIZE, TINY, make_datamodule, make_engine

    from anomalib_fod import Fod

    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, train_batch_size=3, eval_batch_size=4)
    model = Fod(pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)), visualizer=False,
                training_steps=5, **TINY)
    planned = 1000
    engine = make_engine(tmp_path, max_epochs=planned, check_val_every_n_epoch=planned)
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.global_step == 5
    post = model.post_processor
    thresholds = torch.stack([post._image_threshold, post._pixel_threshold])  # noqa: SLF001
    assert bool(torch.isfinite(thresholds).all())
    assert engine.trainer.check_val_every_n_epoch == planned


@pytest.mark.parametrize("before", [None, "7"], ids=["unset", "set"])
def test_anomalib_pipeline_sets_max_epochs_only_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    """``--max_epochs`` reaches the pipeline's trainers through ``PL_TRAINER_MAX_EPOCHS``, and the process's
    environment is as it was afterwards (also when the pipeline fails)."""
    import os

    import anomalib.pipelines

    from anomalib_fod.benchmark.anomalib_pipeline import MAX_EPOCHS_VARIABLE, run_anomalib_benchmark

    seen = []

    class FakeBenchmark:
        def run(self, args) -> None:  # noqa: ANN001
            seen.append((args.config, os.environ.get(MAX_EPOCHS_VARIABLE)))
            raise RuntimeError("a job failed")

    monkeypatch.setattr(anomalib.pipelines, "Benchmark", FakeBenchmark)
    if before is None:
        monkeypatch.delenv(MAX_EPOCHS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(MAX_EPOCHS_VARIABLE, before)
    config = tmp_path / "anomalib_benchmark.yaml"
    config.write_text("benchmark: {}\n")
    with pytest.raises(RuntimeError, match="a job failed"):
        run_anomalib_benchmark(config, max_epochs=3)
    assert seen == [(str(config), "3")]
    assert os.environ.get(MAX_EPOCHS_VARIABLE) == before
