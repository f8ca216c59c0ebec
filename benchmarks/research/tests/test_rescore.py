"""``benchmarks/research/rescore.py``: a variant may set the share of training images the nearest-token fit keeps, or
only another blur (the fit is then shared)."""

from __future__ import annotations

from anomalib_fod.models.fod import lightning_model

from rescore import kept_share  # noqa: E402


def test_kept_share_holds_within_the_block_only() -> None:
    original = lightning_model.kept_token_share
    with kept_share(0.25):
        assert lightning_model.kept_token_share(None, 1000) == 0.25
    assert lightning_model.kept_token_share is original
    with kept_share(None):
        assert lightning_model.kept_token_share is original


def test_with_blur_matches_a_model_built_with_that_blur() -> None:
    import torch

    from anomalib_fod import Fod

    from rescore import with_blur  # noqa: E402

    torch.manual_seed(0)
    built = Fod(image_size=(64, 64), blur_sigma=2.0, visualizer=False).model.anomaly_map_generator
    changed = Fod(image_size=(64, 64), visualizer=False)
    with_blur(changed, 2.0)
    scores = [torch.rand(2, 64), torch.rand(2, 16)]
    grids = [(8, 8), (4, 4)]
    expected = built.combine_levels(scores, grids, (64, 64))
    actual = changed.model.anomaly_map_generator.combine_levels(scores, grids, (64, 64))
    assert torch.allclose(expected[0], actual[0])
    with_blur(changed, 0.0)
    assert changed.model.anomaly_map_generator.blur is None
    unblurred = changed.model.anomaly_map_generator.combine_levels(scores, grids, (64, 64))[0]
    assert not torch.allclose(unblurred, expected[0])


def test_a_checkpoint_without_a_draw_seed_refits_with_the_cells(monkeypatch) -> None:  # noqa: ANN001
    from anomalib_fod import Fod

    from rescore import load_seeded  # noqa: E402

    fod = Fod(image_size=(64, 64), visualizer=False)
    monkeypatch.setattr(Fod, "load_from_checkpoint", classmethod(lambda cls, *args, **kwargs: fod))
    assert fod.draw_seed is None
    assert load_seeded("cell.ckpt", 3).draw_seed == 3
    fod.draw_seed = 11  # a checkpoint that kept its run's seed keeps it
    assert load_seeded("cell.ckpt", 3).draw_seed == 11


def test_a_fit_with_the_fine_level_switched_off_scores_as_one_without_it() -> None:
    import torch

    from rescore import without_fine  # noqa: E402
    from test_fine_level import SIZE, fitted  # noqa: E402

    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    switched, plain = fitted(0.25), fitted(0.0)
    with torch.no_grad():
        assert not torch.allclose(switched.model(images).anomaly_map, plain.model(images).anomaly_map)
        without_fine(switched)
        torch.testing.assert_close(switched.model(images).anomaly_map, plain.model(images).anomaly_map)
        torch.testing.assert_close(switched.model(images).pred_score, plain.model(images).pred_score)


def test_a_results_file_of_settings_variants_reopens(tmp_path) -> None:  # noqa: ANN001
    """One-cell scripts (fit_cost.py, fine_latency.py) write their variant as the settings themselves: a second run
    into the same file reads them back as keys instead of failing on an unhashable dict."""
    import json
    from pathlib import Path

    from rescore import open_run

    out = tmp_path / "rows.jsonl"
    rows = [{"dataset": "bottle", "seed": 0, "variant": {"fine_map_weight": 0.25, "blur_sigma": 2}},
            {"dataset": "bottle", "seed": 1, "variant": "default"}]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    *_, done = open_run(Path("benchmarks/shared_datasets_256.yaml"), tmp_path, out, "unused.jsonl")
    assert done == {("bottle", 0, json.dumps({"blur_sigma": 2, "fine_map_weight": 0.25})), ("bottle", 1, "default")}
