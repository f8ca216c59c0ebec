"""The paper's ablation rows (benchmarks/ablation.yaml) really switch the intended parts off.

Every row of the shipped config is built (narrow Transformers, random backbone) and checked:
which correlation branches exist and receive gradients, whether the entropy terms enter the
loss, and which terms the anomaly map reads. Two rows then run end to end through the
benchmark harness on generated data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from anomalib_fod import Fod
from anomalib_fod.benchmark import load_config, main

from fod_helpers import set_random_references

ROOT = Path(__file__).resolve().parents[1]
TINY = {"d_models": [32, 64], "num_heads": 2, "num_layers": 1}
SIZE = 64

# row -> (intra branch, inter branch, entropy in the loss, scoring)
EXPECTED = {
    "Rec": (False, False, False, "rec"),
    "Intra-noEnt-Div": (True, False, False, "div"),
    "Intra-Div": (True, False, True, "div"),
    "Intra-RecDiv": (True, False, True, "rec_div"),
    "InterMean-RecDiv": (False, True, True, "rec_div"),
    "InterCoreset-RecDiv": (False, True, True, "rec_div"),
    "IntraInter-Div": (True, True, True, "div"),
    "Full-RecDiv": (True, True, True, "rec_div"),
}


def _rows() -> dict[str, dict]:
    config = load_config(ROOT / "benchmarks" / "ablation.yaml")
    return {model.name: dict(model.init_args) for model in config.models}


def test_ablation_config_has_the_papers_rows_with_one_recipe() -> None:
    for name in ("ablation", "ablation_cpu"):
        config = load_config(ROOT / "benchmarks" / f"{name}.yaml")
        assert [m.name for m in config.models] == list(EXPECTED)
        assert {m.class_path for m in config.models} == {"anomalib_fod.Fod"}
        assert len({m.max_epochs for m in config.models}) == 1, "every row must train equally long"
        assert {m.init_args["num_layers"] for m in config.models} == {3}, "the paper's depth, not Fod's default"
        assert {d.init_args["train_batch_size"] for d in config.datasets} == {4}


def _build(init_args: dict) -> Fod:
    torch.manual_seed(0)
    # The rows pin the paper's 3 layers; the test model keeps its tiny shape.
    model = Fod(pre_trained=False, image_size=SIZE, visualizer=False, **{**init_args, **TINY})
    set_random_references(model.model, SIZE, SIZE)
    return model


def _grad_norms(model: Fod, images: torch.Tensor) -> tuple[dict[str, float], dict[str, float], float]:
    model.model.train()
    output = model.model(images)
    loss, parts = model.loss(output.tokens, output.levels)
    loss.backward()
    grads = {
        name: (0.0 if p.grad is None else float(p.grad.abs().sum()))
        for name, p in model.model.named_parameters()
        if p.requires_grad
    }
    return grads, {k: float(v.detach()) for k, v in parts.items()}, float(loss.detach())


def _group(grads: dict[str, float], fragment: str) -> list[float]:
    return [value for name, value in grads.items() if fragment in name]


@pytest.mark.parametrize("row", list(EXPECTED))
def test_row_switches_the_intended_branches(row: str) -> None:
    intra, inter, entropy, scoring = EXPECTED[row]
    init_args = _rows()[row]
    model = _build(init_args)
    assert model.hparams["scoring"] == scoring
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    grads, parts, loss = _grad_norms(model, images)

    cross = _group(grads, "cross_attention.")
    intra_sigma = _group(grads, "self_attention.sigma.")
    inter_sigma = _group(grads, "cross_attention.sigma.")
    assert _group(grads, "head.") and all(g > 0 for g in _group(grads, "head."))
    if inter:
        assert cross and all(g > 0 for g in inter_sigma), "inter branch on: its sigmas must learn"
        assert all(g > 0 for g in _group(grads, "ref_embedding."))
    else:
        assert not cross and not _group(grads, "ref_embedding."), "inter off: no inter-attention parameters"
    if intra:
        assert intra_sigma and all(g > 0 for g in intra_sigma), "intra branch on: its sigmas must learn"
    else:
        assert not intra_sigma, "intra off: no intra target parameters"

    # Values: stage 1 + stage 2 = 2 rec - l2 Ent_intra + l2 Ent_inter (the KL terms cancel in value);
    # the patch-wise row has no minimax game and trains on rec alone.
    entropy_weight = 0.5 if entropy else 0.0
    expected = 2 * parts["rec"] - entropy_weight * (parts["intra_entropy"] - parts["inter_entropy"])
    if not (intra or inter):
        expected = parts["rec"]
    assert loss == pytest.approx(expected, rel=1e-5)
    if intra or inter:
        assert (parts["intra_entropy"] if intra else parts["inter_entropy"]) > 0


def _perturbed_map(model: Fod, images: torch.Tensor, fragment: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.model.eval()
    with torch.no_grad():
        before = model.model(images).anomaly_map
        touched = 0
        for name, parameter in model.model.named_parameters():
            if fragment in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
                touched += 1
        after = model.model(images).anomaly_map
    assert touched, f"no parameter matched {fragment!r}"
    return before, after


@pytest.mark.parametrize("row", ["Rec", "Intra-Div", "Intra-RecDiv", "IntraInter-Div", "Full-RecDiv"])
def test_row_scores_with_the_intended_terms(row: str) -> None:
    """Rec ignores the correlations, Div ignores the reconstruction, Rec&Div reads both."""
    _, _, _, scoring = EXPECTED[row]
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    # The sigmas only shape the targets (never the features): they reach the map only through Div.
    before, after = _perturbed_map(_build(_rows()[row]), images, "sigma." if scoring != "rec" else "head.")
    if scoring == "rec":
        assert not torch.allclose(before, after)
        model = _build(_rows()[row])
        model.model.eval()
        with torch.no_grad():  # no sigma at all in the Rec row: the map is reconstruction only
            assert not [n for n, _ in model.model.named_parameters() if "sigma." in n]
        return
    assert not torch.allclose(before, after), "Div must read the learned targets"
    before, after = _perturbed_map(_build(_rows()[row]), images, "head.")
    if scoring == "div":
        torch.testing.assert_close(after, before, msg="Div must not read the reconstruction")
    else:
        assert not torch.allclose(before, after), "Rec&Div must read the reconstruction"


@pytest.mark.slow
def test_two_rows_run_through_the_harness(dummy_dataset: Path, tmp_path: Path) -> None:
    rows = _rows()
    config = yaml.safe_load((ROOT / "benchmarks" / "ablation_cpu.yaml").read_text())
    config.update(output_dir=str(tmp_path / "run"), image_size=[SIZE, SIZE], accelerator="cpu", isolate_cells=False)
    config["datasets"] = [
        {
            "name": "dummy",
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(dummy_dataset.parent),
                "category": dummy_dataset.name,
                "train_batch_size": 4,
                "eval_batch_size": 4,
                "num_workers": 0,
            },
        },
    ]
    config["models"] = [
        {"name": name, "class_path": "anomalib_fod.Fod", "max_epochs": 1, "init_args": {**rows[name], **TINY}}
        for name in ("Rec", "InterCoreset-RecDiv", "Full-RecDiv")
    ]
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--config", str(path)]) == 0
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    cells = {cell["model"]: cell for cell in report["cells"]}
    assert set(cells) == {"Rec", "InterCoreset-RecDiv", "Full-RecDiv"}
    for name, cell in cells.items():
        assert cell["status"] == "ok", name
        assert 0.0 <= cell["metrics"]["image_auroc"] <= 1.0
        hparams = cell["hparams"]
        for key, value in rows[name].items():
            assert hparams[key] == (TINY[key] if key in TINY else value), f"{name}: {key}"  # TINY's shape wins
    assert "InterCoreset-RecDiv" in (tmp_path / "run" / "results.md").read_text()

    # The report script turns the run into benchmarks/results/ablation.md's table, verdicts and figures.
    spec = importlib.util.spec_from_file_location("ablation_report", ROOT / "benchmarks" / "ablation_report.py")
    report_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_module)
    with contextlib.redirect_stdout(io.StringIO()):
        assert report_module.main([str(tmp_path / "run"), "--output", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "ablation.md").read_text()
    assert "| patch-wise only (Rec) |" in text and "| full model (Rec&Div) |" in text
    assert "the full model is best" in text
    for figure in ("ablation_auroc.png", "ablation_full_model_dummy.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 10_000
