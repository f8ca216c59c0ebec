"""``benchmarks/research/rescore.py``: a variant may set the share of training images the nearest-token fit keeps."""

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
