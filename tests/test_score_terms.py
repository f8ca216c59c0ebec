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
    category = ["--category", trained_dummy.dataset.name]
    assert script.main([*argv, *category, "--batch-size", "3", "--json", str(out), "--train-residuals"]) == 0
    rows = json.loads(out.read_text())
    # (five model terms + four parts + two train-normalised parts) x (all levels, level 0, level 1)
    assert len(rows) == (5 + 4 + 2) * 3
    assert {r["term"] for r in rows} >= {"rec: MSE part", "rec: 1 - cos part", "MSE / train residual x div"}
    assert "| rec x div, inter (paper) | all levels |" in capsys.readouterr().out
    # The paper row on all levels is the image score of the model re-scored with the paper's rule.
    from anomalib_fod import Fod

    model = Fod.load_from_checkpoint(checkpoint, scoring="rec_div", reconstruction_term="mse_cos").eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in trained_dummy.datamodule.test_dataloader():
            scores.append(model.model(model.pre_processor.transform(batch.image)).pred_score.flatten())
            labels.append(batch.gt_label.flatten().int())
    own = roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())
    paper = next(r for r in rows if r["term"].endswith("(paper)") and r["levels"] == "all levels")
    np.testing.assert_allclose(paper["image_auroc"], own, atol=1e-6)


def test_reconstruction_parts_add_up_to_the_model_term(trained_dummy) -> None:  # noqa: ANN001
    """Upsampling, level mean and blur are linear, so the MSE map plus the 1 - cos map is the rec map."""
    from anomalib_fod.benchmark.curve import preprocess_as_test
    from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator
    from anomalib_fod.models.fod.settings import FodSettings

    script = _load_script()
    model = trained_dummy.model.eval()
    records = script.collect(model, trained_dummy.datamodule.test_dataloader())
    tokens, outputs = records["tokens"][0], records["outputs"][0]
    args = (tokens, outputs, records["grids"], records["size"])
    normalised_mse = script._normalised_mse_generator_class()  # noqa: SLF001
    rec, _ = AnomalyMapGenerator(FodSettings(scoring="rec", reconstruction_term="mse_cos"))(*args)
    mse, _ = AnomalyMapGenerator(FodSettings(scoring="rec", reconstruction_term="mse"))(*args)
    cos, _ = AnomalyMapGenerator(FodSettings(scoring="rec", reconstruction_term="cos"))(*args)
    torch.testing.assert_close(mse + cos, rec, rtol=1e-5, atol=1e-6)
    # Unit per-channel scales leave the MSE as it is; the scales of the training pass are per channel.
    ones = [torch.ones(t.shape[-1]) for t in tokens]
    unit, _ = normalised_mse(FodSettings(scoring="rec_div", reconstruction_term="mse_cos"), ones)(*args)
    plain, _ = AnomalyMapGenerator(FodSettings(scoring="rec_div", reconstruction_term="mse"))(*args)
    torch.testing.assert_close(unit, plain)
    # Batches of 3 (the last one short) average to the per-channel mean over all training tokens at once.
    train = trained_dummy.datamodule.train_data
    batched = torch.utils.data.DataLoader(train, batch_size=3, collate_fn=train.collate_fn)
    scales = script.train_residual_scales(model, batched)
    whole = preprocess_as_test(model, next(iter(torch.utils.data.DataLoader(train, batch_size=len(train), collate_fn=train.collate_fn))))
    with torch.no_grad():
        for level, feature, scale in zip(model.model.levels, model.model.extract_features(whole.image), scales, strict=True):
            flat = feature.flatten(2).transpose(1, 2)
            output = level(flat, int(feature.shape[-2]), int(feature.shape[-1]), False, False, False)
            torch.testing.assert_close(scale, (flat - output.reconstruction).square().mean(dim=(0, 1)), rtol=1e-4, atol=1e-7)
