"""``benchmarks/research/screen_context.py``: the context predictor reads nothing within its radius, nor hidden tokens."""

from __future__ import annotations

import pytest
import torch

from screen_context import ContextPredictor, neighbourhood_mask


def reads(predictor: ContextPredictor, grid: tuple[int, int], query: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``(L,)`` bool: which input tokens the prediction at ``query`` depends on (non-zero gradient)."""
    tokens = torch.randn(1, grid[0] * grid[1], 6, requires_grad=True)
    predictor(tokens, hidden)[0, query].square().sum().backward()
    return tokens.grad[0].abs().sum(-1) > 0


@pytest.mark.parametrize("radius", [1, 2])
def test_a_prediction_never_reads_its_own_neighbourhood(radius: int) -> None:
    torch.manual_seed(0)
    grid = (6, 7)
    predictor = ContextPredictor(6, grid, radius, dim=16, heads=2)
    for query in (0, 17, 41):
        seen = reads(predictor, grid, query)
        window = neighbourhood_mask(*grid, radius)[query]
        assert not seen[window].any(), "the query read a token within its radius"
        assert seen[~window].all(), "every token outside the radius should reach the prediction"


def test_hidden_tokens_reach_no_prediction() -> None:
    torch.manual_seed(0)
    grid = (5, 5)
    predictor = ContextPredictor(6, grid, 1, dim=16, heads=2)
    hidden = torch.zeros(1, 25, dtype=torch.bool)
    hidden[0, [3, 20, 24]] = True
    seen = reads(predictor, grid, 12, hidden)
    assert not seen[hidden[0]].any()
    assert seen[~hidden[0] & ~neighbourhood_mask(*grid, 1)[12]].all()


def test_the_report_gives_each_seeds_gain_over_its_own_reference(tmp_path) -> None:  # noqa: ANN001
    import json

    from screen_context import report

    rows = [
        {"candidate": "c", "dataset": d, "seed": seed, "step": step, "image_auroc": image, "pixel_auroc": 0.9}
        for d in ("a", "b")
        for seed, step, image in ((0, 0, 0.80), (1, 0, 0.70), (0, 500, 0.86), (1, 500, 0.72))
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report([tmp_path])
    assert "+0.0400 (min +0.0200, n 2) / +0.0000" in text  # (0.06 + 0.02) / 2, not a difference of means
    assert "`c`: mean learning gain +0.0400 image / +0.0000 pixel AUROC; lowest dataset +0.0400 / +0.0000" in text


def test_the_bound_takes_each_datasets_largest_gain_over_files_and_candidates(tmp_path) -> None:  # noqa: ANN001
    import json

    from screen_context import gain_bound

    def rows(candidate: str, dataset: str, last: int, image: tuple[float, float], pixel: tuple[float, float]) -> str:
        return "".join(json.dumps({"candidate": candidate, "dataset": dataset, "seed": 0, "step": step,
                                   "image_auroc": i, "pixel_auroc": p}) + "\n"
                       for step, i, p in ((0, image[0], pixel[0]), (last, image[1], pixel[1])))

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text(rows("x", "a", 500, (0.8, 0.9), (0.90, 0.91)) + rows("y", "a", 500, (0.8, 0.8), (0.90, 0.93))
                     + rows("x", "b", 500, (0.9, 0.88), (0.95, 0.94)))
    second.write_text(rows("z", "b", 1000, (0.9, 0.9), (0.95, 0.96)))
    text = gain_bound([first, second])
    assert "| a | +0.1000 | `x` (first, n 1) | +0.0300 | `y` (first, n 1) |" in text
    assert "| b | +0.0000 | `z` (second, n 1) | +0.0100 | `z` (second, n 1) |" in text
    assert "+0.0500 image / +0.0200 pixel AUROC" in text
