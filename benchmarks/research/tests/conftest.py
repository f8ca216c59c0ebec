"""The research scripts' own tests: ``python -m pytest benchmarks/research/tests`` (not part of the product's suite).

They share the product tests' helpers (``tests/fod_helpers.py``) and import the scripts from ``benchmarks/research``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

RESEARCH = Path(__file__).resolve().parents[1]
REPO_ROOT = RESEARCH.parents[1]
sys.path[:0] = [str(RESEARCH), str(REPO_ROOT / "tests")]

from fod_helpers import DUMMY_COUNTS, DUMMY_SIZE, TEST_THREADS  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def dummy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Category folder of a tiny generated MVTec-layout dataset (64x64)."""
    from anomalib_fod.data.dummy import make_dummy_mvtec

    return make_dummy_mvtec(
        tmp_path_factory.mktemp("datasets"), category="dummy", size=(DUMMY_SIZE, DUMMY_SIZE), seed=0, **DUMMY_COUNTS
    )
