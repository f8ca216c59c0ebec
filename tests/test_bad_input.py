"""Bad input data: empty/missing training folders, unusual image formats, unreadable files.

What anomalib 2.7 does by itself (checked here so a change in anomalib shows up):

- ``Folder`` with a missing ``normal_dir``: ``FileNotFoundError: Path does not exist: <dir>``;
  with an empty one: ``RuntimeError: Found 0 ... images in <dir>`` -- both clear, kept as they are.
- ``MVTecAD`` with an empty or missing ``<category>/train/good``: a nameless
  ``ValueError: num_samples should be a positive integer value, but got num_samples=0`` from
  PyTorch's sampler. FOD now stops first with :class:`EmptyTrainingSetError` naming the folder.
- A truncated or corrupt image: ``OSError: image file is truncated`` from PIL in the middle of the
  first epoch, without the file name. FOD now checks every image and mask file when ``fit``
  starts and raises :class:`UnreadableImageError` listing all of them with the fix.
- Grey, RGBA, palette, 16-bit PNGs and mixed sizes: accepted (PIL converts to RGB, the collate
  function resizes a mixed batch). 16-bit values above 255 are clipped by that conversion; FOD
  warns with the file names.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fod_helpers import DUMMY_SIZE, TINY, make_engine
from PIL import Image

from anomalib_fod.data import validate
from anomalib_fod.data.dummy import make_dummy_mvtec
from anomalib_fod.data.validate import (
    EmptyTrainingSetError,
    UnreadableImageError,
    check_image_file,
    validate_image_files,
)


def tiny_fod():
    from anomalib_fod import Fod

    return Fod(
        pre_trained=False,
        pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)),
        visualizer=False,
        **TINY,
    )


def mvtec(root: Path, category: str = "dummy", **kwargs):
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0, **kwargs)


def small_dataset(root: Path) -> Path:
    return make_dummy_mvtec(root, n_train=4, n_test_good=2, n_test_bad=2, size=(DUMMY_SIZE, DUMMY_SIZE))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rgb_array(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# validate_image_files on single files


def test_validate_image_files_names_every_unreadable_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb_array()).save(good)
    truncated_png = tmp_path / "truncated.png"
    shutil.copy(good, truncated_png)
    truncate(truncated_png)
    jpeg = tmp_path / "truncated.jpg"
    Image.fromarray(rgb_array(64, 64)).save(jpeg, quality=90)
    truncate(jpeg)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"

    paths = [good, truncated_png, jpeg, garbage, empty, missing, good]  # duplicates are checked once
    problems = dict(validate_image_files(paths))
    assert set(problems) == {truncated_png, jpeg, garbage, empty, missing}
    assert "truncated" in problems[truncated_png]
    assert "cannot identify" in problems[garbage]
    assert "does not exist" in problems[missing]


def test_valid_formats_pass_and_16_bit_clipping_is_flagged(tmp_path):
    base = rgb_array()
    grey = Image.fromarray(base[..., 0])
    files = {
        "rgb": Image.fromarray(base),
        "grey": grey,
        "rgba": Image.fromarray(np.dstack([base, np.full(base.shape[:2], 128, np.uint8)])),
        "palette": Image.fromarray(base).convert("P"),
        "binary": grey.convert("1"),
        "grey16_low": Image.fromarray(base[..., 0].astype(np.uint16)),  # 16-bit file, 8-bit values
        "grey16": Image.fromarray(base[..., 0].astype(np.uint16) * 257),
    }
    for name, image in files.items():
        image.save(tmp_path / f"{name}.png")
    results = {r.path.stem: r for r in validate.inspect_image_files(sorted(tmp_path.glob("*.png")))}
    assert all(r.error is None for r in results.values())
    assert results["grey16"].warning is not None and "clips" in results["grey16"].warning
    assert all(r.warning is None for name, r in results.items() if name != "grey16")
    # The finding behind the warning: anomalib's reader saturates 16-bit values.
    from anomalib.data.utils import read_image

    assert (read_image(tmp_path / "grey16.png") == 1.0).mean() > 0.9  # noqa: PLR2004
    assert (read_image(tmp_path / "grey16_low.png") == 1.0).mean() < 0.1  # noqa: PLR2004


def test_results_are_cached_until_the_file_changes(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(rgb_array()).save(path)
    first = check_image_file(path)
    assert first.error is None
    assert check_image_file(path) is first
    truncate(path)  # new size -> new cache key
    assert check_image_file(path).error is not None


# ----------------------------------------------------------------------------------------------
# Empty or missing training folders


def test_folder_reports_missing_and_empty_normal_dirs_itself(tmp_path):
    """anomalib's Folder already names the folder: FOD leaves these errors alone."""
    from anomalib.data import Folder

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        Folder(name="x", root=tmp_path, normal_dir="nonexistent", num_workers=0).setup()
    with pytest.raises(RuntimeError, match="Found 0 .* images in .*empty"):
        Folder(name="x", root=tmp_path, normal_dir="empty", num_workers=0).setup()


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_empty_mvtec_training_folder_is_a_clear_error(tmp_path, case):
    category = small_dataset(tmp_path / "data")
    train_dir = category / "train"
    if case == "empty":
        for path in (train_dir / "good").iterdir():
            path.unlink()
    else:
        shutil.rmtree(train_dir)
    engine = make_engine(tmp_path / "results")
    with pytest.raises(EmptyTrainingSetError) as info:
        engine.fit(tiny_fod(), datamodule=mvtec(category.parent))
    message = str(info.value)
    assert "training set is empty" in message
    assert str(train_dir) in message  # names the folder
    assert "train/good" in message  # and says where the images go


def test_without_the_check_anomalib_fails_with_a_nameless_error(tmp_path, monkeypatch):
    """Documents why the check exists: with it stubbed out, the error names no folder."""
    category = small_dataset(tmp_path / "data")
    for path in (category / "train" / "good").iterdir():
        path.unlink()
    monkeypatch.setattr(validate, "check_training_set", lambda datamodule: None)
    engine = make_engine(tmp_path / "results")
    with pytest.raises(ValueError, match="num_samples") as info:
        engine.fit(tiny_fod(), datamodule=mvtec(category.parent))
    assert str(category) not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Unreadable files end to end


def test_unreadable_files_stop_fit_before_training_with_every_name(tmp_path):
    category = small_dataset(tmp_path / "data")
    bad_train = category / "train" / "good" / "002.png"
    bad_test = category / "test" / "good" / "001.png"
    bad_mask = next((category / "ground_truth").rglob("*_mask.png"))
    truncate(bad_train)
    bad_test.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncate(bad_mask)
    model = tiny_fod()
    engine = make_engine(tmp_path / "results")
    with pytest.raises(UnreadableImageError) as info:
        engine.fit(model, datamodule=mvtec(category.parent))
    message = str(info.value)
    assert "3 image files" in message
    for path in (bad_train, bad_test, bad_mask):
        assert str(path) in message
    assert "Remove or replace these files" in message
    assert model.global_step == 0
    assert not model.model.has_reference  # stopped before the reference pass


def test_truncated_file_check_can_be_skipped(tmp_path, monkeypatch):
    """With the check off, the crash comes from PIL mid-run without the file name (anomalib's behaviour)."""
    category = small_dataset(tmp_path / "data")
    bad = category / "train" / "good" / "002.png"
    truncate(bad)
    monkeypatch.setenv(validate.SKIP_ENV, "1")
    engine = make_engine(tmp_path / "results")
    with pytest.raises(OSError, match="truncated") as info:
        engine.fit(tiny_fod(), datamodule=mvtec(category.parent))
    assert str(bad) not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Unusual but valid formats end to end


def _convert(path: Path, kind: str, size: tuple[int, int] | None = None) -> None:
    """Rewrite an RGB PNG as another kind of PNG (and size)."""
    image = Image.open(path).convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]))
    if kind == "grey":
        image = image.convert("L")
    elif kind == "rgba":
        image = image.convert("RGBA")
        image.putalpha(200)
    elif kind == "palette":
        image = image.convert("P")
    elif kind == "grey16":
        image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    image.save(path)


def test_mixed_formats_and_sizes_train_and_test(tmp_path, caplog):
    from anomalib.data import Folder

    category = make_dummy_mvtec(
        tmp_path / "data",
        n_train=6,
        n_test_good=2,
        n_test_bad=2,
        size=(DUMMY_SIZE, DUMMY_SIZE),
        defect_types=("blob",),
    )
    train = sorted((category / "train" / "good").glob("*.png"))
    for path, kind in zip(train, ["grey", "rgba", "palette", "grey16", "rgb", "rgb"], strict=True):
        _convert(path, kind)
    _convert(train[4], "rgb", size=(80, 96))  # mixed sizes within one training batch
    _convert(train[5], "grey", size=(48, 56))
    good = sorted((category / "test" / "good").glob("*.png"))
    _convert(good[0], "grey16")
    _convert(good[1], "palette", size=(72, 72))
    bad = sorted((category / "test" / "blob").glob("*.png"))
    masks = sorted((category / "ground_truth" / "blob").glob("*.png"))
    _convert(bad[0], "rgba")
    _convert(bad[1], "grey", size=(96, 80))
    Image.open(masks[1]).resize((80, 96), Image.NEAREST).save(masks[1])  # a mask matches its image

    datamodule = Folder(
        name="mixed",
        root=category,
        normal_dir="train/good",
        abnormal_dir="test/blob",
        normal_test_dir="test/good",
        mask_dir="ground_truth/blob",
        train_batch_size=6,
        eval_batch_size=4,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    model = tiny_fod()
    engine = make_engine(tmp_path / "results")
    with caplog.at_level(logging.WARNING, logger="anomalib_fod.data.validate"):
        engine.fit(model, datamodule=datamodule)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.name == "anomalib_fod.data.validate")
    assert str(train[3]) in warnings and str(good[0]) in warnings  # the 16-bit files
    assert "Convert them to 8-bit" in warnings
    assert model.model.has_reference
    predictions = engine.predict(model, datamodule=datamodule)
    scores = torch.cat([p.pred_score.flatten() for p in predictions])
    assert scores.numel() == 4  # noqa: PLR2004
    assert torch.isfinite(scores).all()
    maps = torch.cat([p.anomaly_map for p in predictions])
    assert maps.shape[-2:] == (DUMMY_SIZE, DUMMY_SIZE) and torch.isfinite(maps).all()
