"""DDP on CPU (2 processes, gloo): reference features and test metrics equal single-device ones.

The DDP run happens in a subprocess (``tests/_ddp_fit.py``): Lightning's ``ddp`` strategy
launches the second rank by re-running the command line, which must not be pytest's. It trains
a tiny FOD for one epoch on 5 training images with 2 ranks. A ``DistributedSampler`` pads 5 to 6
by repeating an image; the reference pass must not (each image counts exactly once).

What is compared:

- reference features: DDP (all-reduced shard sums) vs the single-device callback on the same
  checkpoint's frozen backbone, within 1e-5 (float32 features summed in float64);
- test metrics: anomalib's ``engine.test`` under DDP (metric states gathered from both ranks) vs
  a single-device ``engine.test`` of the same checkpoint, within 1e-6 (F1 scores only where no prediction
  sits on its threshold, whose label the last bit of its score decides). The *training* itself is not
  compared with a single-device run: DDP averages gradients over 2 ranks (an effective batch of
  2 x 2) and shuffles differently, so the weights legitimately differ. The test set has 4 images,
  a multiple of the world size, so the test sampler repeats none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fod_helpers import DUMMY_SIZE, make_engine
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from anomalib_fod.data.dummy import make_dummy_mvtec
from anomalib_fod.models.fod.callbacks import ReferenceFeatureCallback
from anomalib_fod.models.fod.fitting import iterate_pooled_features, mean_reference, shard_loader

SCRIPT = Path(__file__).resolve().parent / "_ddp_fit.py"
N_TRAIN = 5  # odd: DistributedSampler pads the 2 shards to 3 + 3
REFERENCE_ATOL = 1e-5
METRIC_ATOL = 1e-6
TIE_ATOL = 1e-5  # normalised scores this close to anomalib's 0.5 threshold: their label is the rounding's


def _datamodule(root: Path):
    sys.path.insert(0, str(SCRIPT.parent))
    from _ddp_fit import datamodule

    data = datamodule(root, "dummy")
    data.setup("fit")
    return data


def _references(model) -> list[torch.Tensor]:
    return [level.ref_features.clone() for level in model.model.levels]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_dummy_mvtec(root / "data", n_train=N_TRAIN, n_test_good=2, n_test_bad=2, size=(DUMMY_SIZE, DUMMY_SIZE))
    out = root / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(SCRIPT), str(root / "data"), "dummy", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SimpleNamespace(data_root=root / "data", checkpoint=out / "ddp.ckpt", metrics=out / "ddp_metrics.json")


def test_shard_loader_covers_every_sample_once():
    dataset = list(range(N_TRAIN))
    loader = DataLoader(dataset, batch_size=2, shuffle=True)
    seen = [int(x) for rank in range(2) for batch in shard_loader(loader, rank, 2) for x in batch]
    assert sorted(seen) == dataset
    padded = [i for rank in range(2) for i in DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)]
    assert len(padded) == N_TRAIN + 1  # what the trainer's sampler would have given


def test_mean_reference_with_an_empty_shard_keeps_shapes_and_adds_nothing():
    features = [[torch.ones(2, 3, 4, 4)]]
    (mean,) = mean_reference(iter(features))
    torch.testing.assert_close(mean, torch.ones(3, 4, 4))
    with pytest.raises(RuntimeError, match="training set is empty"):
        mean_reference(iter(features), weight=0.0)  # single process: zero images in total


@pytest.mark.slow
def test_ddp_reference_features_equal_single_device(ddp_run):
    from anomalib_fod import Fod

    model = Fod.load_from_checkpoint(ddp_run.checkpoint)
    ddp_refs = _references(model)
    assert all(r.numel() for r in ddp_refs)

    # The single-device callback on the same frozen backbone, over the shuffled training loader.
    data = _datamodule(ddp_run.data_root)
    assert len(data.train_data) == N_TRAIN
    for level in model.model.levels:
        level.ref_features = torch.empty(0, level.ref_features.shape[-1])
    trainer = SimpleNamespace(
        train_dataloader=data.train_dataloader(),
        world_size=1,
        global_rank=0,
        ckpt_path=None,
        is_global_zero=False,
    )
    ReferenceFeatureCallback("mean").on_train_start(trainer, model)
    single_refs = _references(model)
    for ddp_ref, single_ref in zip(ddp_refs, single_refs, strict=True):
        torch.testing.assert_close(ddp_ref, single_ref, rtol=0, atol=REFERENCE_ATOL)

    # Sensitivity: the padded DistributedSampler shards (one image twice) give a visibly different mean.
    loader = DataLoader(data.train_data, batch_size=1, collate_fn=data.train_data.collate_fn)
    transform = model.pre_processor.transform
    per_image = list(iterate_pooled_features(model.model, loader, transform, torch.device("cpu"), progress=False))
    padded = [i for r in range(2) for i in DistributedSampler(data.train_data, num_replicas=2, rank=r, shuffle=False)]
    padded_means = mean_reference(iter([per_image[i] for i in padded]))  # (C, h, w) per level
    biased = max(
        float((ref - mean.flatten(1).T).abs().max()) for ref, mean in zip(single_refs, padded_means, strict=True)
    )
    assert biased > 100 * REFERENCE_ATOL, biased


@pytest.mark.slow
def test_ddp_test_metrics_equal_single_device(ddp_run, tmp_path):
    from anomalib_fod import Fod

    ddp_metrics = json.loads(ddp_run.metrics.read_text())
    assert {"image_AUROC", "pixel_AUROC"} <= ddp_metrics.keys()
    model = Fod.load_from_checkpoint(ddp_run.checkpoint)
    data = _datamodule(ddp_run.data_root)
    assert len(data.test_data) % 2 == 0  # no padded duplicates in the DDP test shards
    engine = make_engine(tmp_path)
    single_metrics = engine.test(model, datamodule=data, verbose=False)[0]
    assert ddp_metrics.keys() == single_metrics.keys()
    # The adaptive thresholds are scores of validation images, which here are test images too: a prediction
    # on its threshold gets its label from the last bit of its score, and those bits differ between
    # processes and batch sizes (2 ulp measured). Metrics that threshold are compared where none sits there.
    predictions = engine.predict(model, dataloaders=data.test_dataloader())
    on_threshold = {
        "image_F1Score": any(bool(((b.pred_score - 0.5).abs() < TIE_ATOL).any()) for b in predictions),
        "pixel_F1Score": any(bool(((b.anomaly_map - 0.5).abs() < TIE_ATOL).any()) for b in predictions),
    }
    compared = [name for name in ddp_metrics if not on_threshold.get(name, False)]
    assert {"image_AUROC", "pixel_AUROC"} <= set(compared)
    for name in compared:
        value = ddp_metrics[name]
        assert abs(float(single_metrics[name]) - value) <= METRIC_ATOL, (name, value, float(single_metrics[name]))
