"""Constants and helpers shared by the test modules (import as ``from fod_helpers import ...``)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# One intra-op thread unless FOD_TEST_THREADS says otherwise (conftest applies it; the CLI tests pass it
# to their subprocesses as OMP_NUM_THREADS). On CPUs shared with other jobs, OpenMP's two-thread barriers
# wait for a descheduled core at every op: one forward of the tiny model at 64 px took 0.08 s with 1
# thread and 2.7 s with 2 threads on a loaded 2-core machine.
TEST_THREADS = int(os.environ.get("FOD_TEST_THREADS", "1"))

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DATA_ROOT = REPO_ROOT / "anomalib_fod" / "data"  # holds the battery_weld category

# Small Transformers: the behaviour under test does not depend on the width.
TINY = {"d_models": (32, 64), "num_heads": 2, "num_layers": 1}
# The map-only levels read backbone stages from images (the finer stage, the finest unpooled): tests that feed
# backbone features, or fit the statistics from them, build models without them (their own tests are in
# test_fine_level.py and test_aligned_level.py).
WITHOUT_MAP_LEVELS = {"fine_map_weight": 0.0, "aligned_map_weight": 0.0}
# The paper's score: reconstruction times divergence, needing no fitted statistics. Tests of the geometry,
# the branches and the divergence use it; Fod's default (the whitened residual) has its own tests.
PAPER_SCORE = {
    "scoring": "rec_div",
    "reconstruction_term": "mse_cos",
    "map_level_weights": None,
    "map_align_corners": True,
}
DUMMY_SIZE = 64
DUMMY_COUNTS = {"n_train": 10, "n_test_good": 4, "n_test_bad": 6}
# 10 training images in batches of 3 and 10 test images in batches of 4: both last batches are partial.
TRAIN_BATCH, EVAL_BATCH = 3, 4


def set_random_references(model: torch.nn.Module, height: int, width: int, batch: int = 2) -> None:
    """Give a ``FodModel`` mean references computed from random images of ``height x width``."""
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(batch, 3, height, width, generator=generator)
    model.set_mean_reference([f.mean(dim=0) for f in model.extract_features(images)])


def make_datamodule(root: Path, category: str, train_batch_size: int, eval_batch_size: int):
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=train_batch_size,
        eval_batch_size=eval_batch_size,
        num_workers=0,
    )


def make_engine(root: Path, max_epochs: int = 1, accelerator: str = "cpu", **kwargs):
    from anomalib.engine import Engine

    return Engine(
        default_root_dir=root,
        logger=False,
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every connection attempt fail and put the Hugging Face hub offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        del args, kwargs
        msg = "network access attempted in an offline test"
        raise OSError(msg)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def fit_and_run(fod: torch.nn.Module, features: list[torch.Tensor], image_size: tuple[int, int] = (64, 64)) -> tuple:
    """Fit a ``FodModel``'s residual statistics on ``features``, then, in eval mode without gradients, its output on
    them and the run of its levels: ``(output, run)``."""
    from anomalib_fod.models.fod.fitting import fit_statistics  # noqa: PLC0415

    fit_statistics(fod, [features])
    fod.eval()
    with torch.no_grad():
        return fod.forward_features(features, image_size), fod.run_levels(features)


def fit_and_reload(dataset: Path, root: Path, size: int, **settings):  # noqa: ANN003, ANN201 - two Fod models
    """A tiny ``Fod(**settings)`` fitted through ``Engine`` on ``dataset`` (4 steps), and the same model reloaded
    from its best checkpoint, after checking that both predict the same scores and maps."""
    from lightning.pytorch import seed_everything

    from anomalib_fod import Fod

    seed_everything(0, workers=True)
    datamodule = make_datamodule(dataset.parent, dataset.name, TRAIN_BATCH, EVAL_BATCH)
    model = Fod(pre_processor=Fod.configure_pre_processor((size, size)), visualizer=False, training_steps=4,
                **TINY, **settings)
    engine = make_engine(root, max_epochs=10)
    engine.fit(model, datamodule=datamodule)
    predictions = engine.predict(model, datamodule=datamodule)
    reloaded = Fod.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path)
    again = engine.predict(reloaded, datamodule=datamodule)
    for first, second in zip(predictions, again, strict=True):
        torch.testing.assert_close(second.pred_score, first.pred_score)
        torch.testing.assert_close(second.anomaly_map, first.anomaly_map)
    return model, reloaded


def save_from_before(model: torch.nn.Module, path: Path, setting: str, module: str) -> Path:
    """Save ``model`` (a fitted ``Fod``) as a checkpoint saved before ``setting`` existed: without that hyper-parameter
    and without the state of ``anomaly_map_generator.<module>``."""
    hparams = {k: v for k, v in model.hparams.items() if k != setting}
    state = {k: v for k, v in model.state_dict().items() if f".{module}." not in k}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.5.0"}, path)
    return path


def assert_budget_is_the_boundary(monkeypatch, budget: str, needed: int, start, match: str) -> None:  # noqa: ANN001
    """A train-start check passes with ``budget`` (a module constant of the callbacks) at exactly ``needed`` bytes and
    raises ``ValueError`` matching ``match`` one byte below it; the budget is left one byte short."""
    from anomalib_fod.models.fod import callbacks  # noqa: PLC0415

    monkeypatch.setattr(callbacks, budget, needed)
    start()  # within the budget: nothing happens
    monkeypatch.setattr(callbacks, budget, needed - 1)
    with pytest.raises(ValueError, match=match):
        start()


@contextlib.contextmanager
def counted_position_products() -> Iterator[list[torch.Size]]:
    """Within the block, the shapes of every per-position Mahalanobis product (``ResidualStatistics``'s batched
    ``(L, B, C) @ (L, C, C)``) the scoring computes."""
    from anomalib_fod.models.fod.residual_statistics import ResidualStatistics  # noqa: PLC0415

    calls: list[torch.Size] = []
    original = ResidualStatistics._position_distance

    def counted(self: ResidualStatistics, centred: torch.Tensor) -> torch.Tensor:
        calls.append(centred.shape)
        return original(self, centred)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ResidualStatistics, "_position_distance", counted)
        yield calls


def assert_exports_reproduce(
    model: torch.nn.Module, path: Path, images: torch.Tensor, score_tolerance: dict, map_tolerance: float
) -> None:
    """The ONNX graph at ``path`` (onnxruntime, and OpenVINO in float32 where installed) gives ``model``'s scores on
    ``images``: ``score_tolerance`` are ``assert_close``'s ``rtol`` / ``atol`` for the image scores, the maps agree
    within ``map_tolerance`` times their largest value."""
    onnxruntime = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        expected = model(images)
    scale = float(expected.anomaly_map.abs().max())

    def check(score: torch.Tensor, anomaly_map: torch.Tensor) -> None:
        torch.testing.assert_close(score, expected.pred_score, **score_tolerance)
        torch.testing.assert_close(anomaly_map, expected.anomaly_map, rtol=0, atol=map_tolerance * scale)

    session = onnxruntime.InferenceSession(str(path))
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    check(torch.from_numpy(outputs["pred_score"]), torch.from_numpy(outputs["anomaly_map"]))
    openvino = pytest.importorskip("openvino")
    compiled = openvino.Core().compile_model(openvino.convert_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    check(torch.from_numpy(result["pred_score"]), torch.from_numpy(result["anomaly_map"]))


def explain_random_image(model: torch.nn.Module, folder: Path, size: int):  # noqa: ANN201 - an Explanation
    """``explain_image`` of a random ``size`` x ``size`` image saved in ``folder``, after checking that its map and
    image score are the model's own."""
    import numpy as np
    from PIL import Image

    from anomalib_fod.explain import explain_image, load_image

    path = folder / "image.png"
    Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)).save(path)
    explanation = explain_image(model, path)
    with torch.no_grad():
        expected = model.model(model.pre_processor.transform(load_image(path)[None]))
    np.testing.assert_allclose(explanation.anomaly_map, expected.anomaly_map[0, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert explanation.pred_score == pytest.approx(float(expected.pred_score[0]), rel=1e-5)
    return explanation
