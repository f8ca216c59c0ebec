"""The synthetic MVTec-layout generator used by the other tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomalib_fod.data.dummy import make_dummy_mvtec


def test_layout_sizes_and_masks(tmp_path):
    path = make_dummy_mvtec(tmp_path, category="toy", n_train=3, n_test_good=2, n_test_bad=5, size=(48, 80), seed=1)
    assert path == tmp_path / "toy"
    assert len(list((path / "train" / "good").glob("*.png"))) == 3
    assert len(list((path / "test" / "good").glob("*.png"))) == 2
    defects = sorted(p.name for p in (path / "test").iterdir() if p.name != "good")
    assert defects == ["blob", "scratch"]
    assert sum(len(list((path / "test" / d).glob("*.png"))) for d in defects) == 5
    for defect in defects:
        for image_path in (path / "test" / defect).glob("*.png"):
            mask_path = path / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            image = np.asarray(Image.open(image_path))
            mask = np.asarray(Image.open(mask_path))
            assert image.shape == (48, 80, 3)
            assert mask.shape == (48, 80)
            assert set(np.unique(mask)) == {0, 255}
            inside = image[mask > 0].astype(float).mean(axis=-1)
            # the defect is much darker or much brighter than the texture it replaced
            assert (inside.max() < 60) or (inside.min() > 190)
    for image_path in (path / "train" / "good").glob("*.png"):
        assert np.asarray(Image.open(image_path)).shape == (48, 80, 3)


def test_same_seed_same_bytes(tmp_path):
    first = make_dummy_mvtec(tmp_path / "a", n_train=2, n_test_good=1, n_test_bad=2, seed=3)
    second = make_dummy_mvtec(tmp_path / "b", n_train=2, n_test_good=1, n_test_bad=2, seed=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.png"))
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_anomalib_reads_it(dummy_dataset):
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=dummy_dataset.parent, category=dummy_dataset.name, num_workers=0)
    datamodule.setup()
    assert len(datamodule.train_data) == 10
    test = datamodule.test_data
    labels = [int(test[i].gt_label) for i in range(len(test))]
    assert sorted(labels) == [0] * 4 + [1] * 6
    for index in range(len(test)):
        item = test[index]
        assert (item.gt_mask.sum() > 0) == bool(item.gt_label)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="defect_types"):
        make_dummy_mvtec(tmp_path, defect_types=("crack",))
    with pytest.raises(ValueError, match="n_train"):
        make_dummy_mvtec(tmp_path, n_train=0)
