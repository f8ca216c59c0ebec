"""Shared fixtures: a tiny synthetic dataset, tiny model settings and one session-wide trained model.

Everything is sized for 2 shared CPU cores: 64 px images, Transformers of width 32/64 with one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fod_helpers import (
    DUMMY_COUNTS,
    DUMMY_SIZE,
    EVAL_BATCH,
    TEST_THREADS,
    TINY,
    TRAIN_BATCH,
    make_datamodule,
    make_engine,
)

torch.set_num_threads(TEST_THREADS)  # see fod_helpers.TEST_THREADS


@pytest.fixture(scope="session")
def dummy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Category folder of a tiny generated MVTec-layout dataset (64x64)."""
    from anomalib_fod.data.dummy import make_dummy_mvtec

    return make_dummy_mvtec(
        tmp_path_factory.mktemp("datasets"),
        category="dummy",
        size=(DUMMY_SIZE, DUMMY_SIZE),
        seed=0,
        **DUMMY_COUNTS,
    )


@dataclass
class TrainedRun:
    """A fitted tiny FOD with everything needed to inspect it."""

    model: object
    engine: object
    datamodule: object
    dataset: Path
    root: Path


@pytest.fixture(scope="session")
def trained_dummy(dummy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """A tiny FOD fitted for one epoch on the dummy dataset (pre-trained offline backbone weights).

    Shared by the reference, checkpoint and integration tests: read it, do not train it further.
    """
    from lightning.pytorch import seed_everything

    from anomalib_fod import Fod

    seed_everything(0, workers=True)
    root = tmp_path_factory.mktemp("trained_dummy")
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, TRAIN_BATCH, EVAL_BATCH)
    model = Fod(pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)), visualizer=False, **TINY)
    engine = make_engine(root, max_epochs=1)
    engine.fit(model, datamodule=datamodule)
    return TrainedRun(model=model, engine=engine, datamodule=datamodule, dataset=dummy_dataset, root=root)
