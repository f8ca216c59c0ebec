"""``benchmarks/score_terms.py``: every scoring term of a trained FOD, checked against the model's own score."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("score_terms", ROOT / "benchmarks" / "score_terms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_terms_table_and_paper_row_match_the_model(trained_dummy, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from sklearn.metrics import roc_auc_score

    script = _load_script()
    checkpoint = tmp_path / "fod.ckpt"
    trained_dummy.engine.trainer.save_checkpoint(checkpoint)
    out = tmp_path / "terms.json"
    argv = ["--checkpoint", str(checkpoint), "--root", str(trained_dummy.dataset.parent)]
    assert script.main([*argv, "--category", trained_dummy.dataset.name, "--batch-size", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 5 * 3  # five terms x (all levels, level 0, level 1)
    assert "| rec x div, inter (paper) | all levels |" in capsys.readouterr().out
    # The paper row on all levels is the model's own image score.
    model = trained_dummy.model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in trained_dummy.datamodule.test_dataloader():
            scores.append(model.model(model.pre_processor.transform(batch.image)).pred_score.flatten())
            labels.append(batch.gt_label.flatten().int())
    own = roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())
    paper = next(r for r in rows if r["term"].endswith("(paper)") and r["levels"] == "all levels")
    np.testing.assert_allclose(paper["image_auroc"], own, atol=1e-12)
