"""``anomalib-fod explain``: the qualitative figure of a trained tiny FOD (1 epoch on the dummy dataset)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from fod_helpers import DUMMY_SIZE, PAPER_SCORE, TINY, make_datamodule, make_engine
from PIL import Image

from anomalib_fod import cli
from anomalib_fod.data.dummy import make_dummy_mvtec
from anomalib_fod.explain import (
    CORRELATION_PANELS,
    _key_map,
    explain_image,
    figure_size,
    load_image,
    output_names,
    render_explanation,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny FOD (random backbone) fitted for one epoch, and its checkpoint."""
    from lightning.pytorch import seed_everything

    from anomalib_fod import Fod

    root = tmp_path_factory.mktemp("explain")
    category = make_dummy_mvtec(root / "data", n_train=4, n_test_good=2, n_test_bad=2, size=(DUMMY_SIZE, DUMMY_SIZE))
    seed_everything(0)
    model = Fod(
        pre_trained=False,
        pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)),
        visualizer=False,
        **TINY,
    )
    engine = make_engine(root / "results")
    engine.fit(model, datamodule=make_datamodule(category.parent, category.name, 4, 4))
    checkpoint = root / "fod.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    model.eval()
    return model, checkpoint, category


def _check_against_the_model(model, path):  # noqa: ANN001, ANN202
    explanation = explain_image(model, path)
    with torch.no_grad():
        expected = model.model(model.pre_processor.transform(load_image(path)[None]))
    # The explanation runs the attentions on their plain path (it shows their maps), the model on its
    # fused one: equal up to float32 rounding (which the nearest-token part, in held-out z-units, adds to).
    np.testing.assert_allclose(explanation.anomaly_map, expected.anomaly_map[0, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert explanation.pred_score == pytest.approx(float(expected.pred_score[0]), rel=1e-5, abs=1e-5)
    return explanation


def test_explanation_maps_match_the_model(trained):
    model, checkpoint, category = trained
    path = sorted((category / "test" / "blob").glob("*.png"))[0]
    # The default score: the whitened residual (per level's own statistics), plus the nearest-token distance in
    # held-out z-units where the fit chose it (four random training images: it does).
    generator = model.model.anomaly_map_generator
    assert generator.nearest_active
    for parts, level in zip(_check_against_the_model(model, path).components, generator.nearest, strict=True):
        assert set(parts) == {"rec", "nearest", "score"}
        rec_z = (parts["rec"] - float(level.units[0])) / float(level.units[1])
        np.testing.assert_allclose(parts["score"], rec_z + parts["nearest"], rtol=1e-5, atol=1e-5)
    from anomalib_fod import Fod

    paper = Fod.load_from_checkpoint(checkpoint, **PAPER_SCORE).eval()
    explanation = _check_against_the_model(paper, path)

    assert explanation.grids == [(8, 8), (4, 4)]  # strides 8 and 16 at 64 px
    assert explanation.image.shape == (DUMMY_SIZE, DUMMY_SIZE, 3)
    # default token: the one under the anomaly map's maximum
    row_px, col_px = np.unravel_index(explanation.anomaly_map.argmax(), explanation.anomaly_map.shape)
    assert explanation.token == (row_px * 8 // DUMMY_SIZE, col_px * 8 // DUMMY_SIZE)

    assert set(explanation.correlations) == set(CORRELATION_PANELS)
    for name, values in explanation.correlations.items():
        assert values.shape == (8, 8), name
        assert values.sum() == pytest.approx(1.0, abs=1e-5), name  # one query's row of a row-stochastic map
        assert (values >= 0).all()
    assert explanation.correlations["intra attention"].std() > 0

    for parts, grid in zip(explanation.components, explanation.grids, strict=True):
        assert set(parts) == {"rec", "div", "score"}
        assert all(v.shape == grid for v in parts.values())
        np.testing.assert_allclose(parts["score"], parts["rec"] * parts["div"], rtol=1e-6, atol=1e-7)


def test_cli_writes_one_png_per_image(trained, tmp_path, monkeypatch, capsys):
    _, checkpoint, category = trained
    images = [sorted((category / "test" / kind).glob("*.png"))[0] for kind in ("blob", "good")]
    assert images[0].name == images[1].name  # same stem: the folder name tells them apart
    output = tmp_path / "figures"
    argv = ["anomalib-fod", "explain", "--checkpoint", str(checkpoint), "--image", f"[{', '.join(map(str, images))}]"]
    monkeypatch.setattr(sys, "argv", [*argv, "--output", str(output), "--token", "[2, 5]"])
    assert "explain" in cli.PLUGIN_COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    assert "token (2, 5)" in capsys.readouterr().out

    written = sorted(output.glob("*.png"))
    assert [p.name for p in written] == ["blob_000_explain.png", "good_000_explain.png"]
    expected_size = figure_size(explain_image(trained[0], images[0]))
    for path in written:
        with Image.open(path) as png:
            assert png.size == expected_size
            pixels = np.asarray(png.convert("RGB"))
        assert pixels.std() > 20  # not blank  # noqa: PLR2004
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # images and heat maps  # noqa: PLR2004


def test_token_outside_the_grid_is_a_clear_error(trained, tmp_path, capsys):
    model, checkpoint, category = trained
    path = sorted((category / "test" / "good").glob("*.png"))[0]
    with pytest.raises(ValueError, match=r"outside level 0's 8x8 token grid"):
        explain_image(model, path, token=(8, 0))
    with pytest.raises(ValueError, match="level must be"):
        explain_image(model, path, level=2)
    from anomalib_fod.explain import main

    status = main(["--checkpoint", str(checkpoint), "--image", str(path), "--output", str(tmp_path), "--token", "[9, 9]"])
    assert status == 1
    assert "outside" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--image", str(path)]) == 2  # noqa: PLR2004


def test_models_without_inter_branch_render(tmp_path, dummy_dataset):
    """Ablations: an intra-only model (needs no references) has no inter panels and an intra-score."""
    from anomalib_fod import Fod

    model = Fod(
        pre_trained=False,
        with_inter=False,
        pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)),
        visualizer=False,
        **PAPER_SCORE,  # untrained: a score without fitted statistics, with the intra divergence in it
        **TINY,
    )
    path = sorted((dummy_dataset / "test" / "good").glob("*.png"))[0]
    explanation = explain_image(model, path, level=1)
    assert set(explanation.correlations) == {"intra attention", "intra target"}
    assert explanation.div_name == "intra-score"
    assert explanation.correlations["intra target"].shape == (4, 4)
    written = render_explanation(explanation, tmp_path / "intra.png")
    with Image.open(written) as png:
        assert png.size == figure_size(explanation)


def test_coreset_keys_are_placed_on_their_cells():
    row = torch.tensor([0.5, 0.25, 0.25])
    positions = torch.tensor([[0.0, 0.0], [1.2, 0.9], [0.8, 1.1]])  # the last two round to cell (1, 1)
    grid_map = _key_map(row, (2, 2), positions)
    np.testing.assert_allclose(grid_map, [[0.5, 0.0], [0.0, 0.5]])
    full = torch.arange(4.0)
    np.testing.assert_array_equal(_key_map(full, (2, 2), None), [[0, 1], [2, 3]])


def test_output_names_are_unique():
    from pathlib import Path

    paths = [Path("a/x.png"), Path("b/x.png"), Path("c/y.png"), Path("a/x.jpg")]
    names = output_names(paths)
    assert len(set(names)) == len(names)
    assert names[2] == "y_explain.png"
