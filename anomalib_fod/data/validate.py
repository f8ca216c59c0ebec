"""Checks of a datamodule's image files before training, with errors that name the files.

anomalib reads images lazily, one batch at a time, with ``PIL.Image.open(path).convert("RGB")``.
A corrupt or truncated file therefore stops training (or testing) in the middle of an epoch with
``OSError: image file is truncated`` or ``UnidentifiedImageError`` and no file name, possibly
after hours of training. An empty training split fails with ``num_samples should be a positive
integer value, but got num_samples=0`` from PyTorch's sampler. :func:`check_datamodule` runs at
the start of ``fit`` (``Fod.on_fit_start``) and turns both into one clear error:

- :class:`EmptyTrainingSetError`: no training images, naming the folder they were expected in;
- :class:`UnreadableImageError`: every image or mask file of the train/val/test splits that
  cannot be decoded, listed by name, with the fix (remove or replace them).

The check decodes each file fully (``Image.load``): ``Image.verify`` reads only the headers and
the chunk checksums and does not catch every truncation. It is one pass over the data in a
thread pool (Pillow decodes without the GIL), cached per file (path, size, mtime) within a
process, and shows a progress bar for large sets. ``FOD_SKIP_IMAGE_CHECK=1`` switches it off.

Files that decode but that anomalib's reader would silently damage are reported as a warning:
16-bit (and 32-bit) grey images whose values exceed 255 are clipped at 255 by PIL's RGB
conversion, so they train as mostly white images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SKIP_ENV = "FOD_SKIP_IMAGE_CHECK"
PROGRESS_MIN_FILES = 200  # no progress bar for small sets
HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
EIGHT_BIT_MAX = 255
SPLITS = ("train", "val", "test")


class UnreadableImageError(ValueError):
    """Image files of the dataset cannot be decoded; the message lists every one of them."""


class EmptyTrainingSetError(ValueError):
    """The training split has no images; the message names where they were expected."""


@dataclass(frozen=True)
class ImageCheck:
    """Outcome for one file: ``error`` when it cannot be decoded, ``warning`` when anomalib would damage it."""

    path: Path
    error: str | None = None
    warning: str | None = None


_CACHE: dict[tuple[str, int, int], ImageCheck] = {}


def _cache_key(path: Path) -> tuple[str, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def check_image_file(path: str | Path) -> ImageCheck:
    """Open and fully decode one image file.

    Returns:
        An :class:`ImageCheck` whose ``error`` says why the file cannot be read (missing, not an
        image, truncated, corrupt) and whose ``warning`` flags 16/32-bit grey values above 255.
    """
    path = Path(path)
    key = _cache_key(path)
    if key is None:
        return ImageCheck(path, error="file does not exist or cannot be accessed")
    if key in _CACHE:
        return _CACHE[key]
    try:
        with Image.open(path) as image:
            image.load()  # full decode: catches truncated and corrupt data, not just bad headers
            warning = None
            if image.mode in HIGH_BIT_MODES:
                peak = float(np.asarray(image).max()) if image.size[0] * image.size[1] else 0.0
                if peak > EIGHT_BIT_MAX:
                    warning = (
                        f"{image.mode} image with values up to {peak:g}: anomalib's reader clips it at 255 "
                        "(mostly white)"
                    )
        result = ImageCheck(path, warning=warning)
    except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
        result = ImageCheck(path, error=f"{error} ({type(error).__name__})")
    _CACHE[key] = result
    return result


def inspect_image_files(
    paths: Iterable[str | Path],
    progress: bool | None = None,
    workers: int | None = None,
) -> list[ImageCheck]:
    """:func:`check_image_file` for every path (duplicates checked once), in input order.

    Args:
        paths: image files.
        progress: show a progress bar; ``None`` shows one from ``PROGRESS_MIN_FILES`` files on.
        workers: decoding threads (default: up to 8, at most the CPU count).
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    if not unique:
        return []
    if progress is None:
        progress = len(unique) >= PROGRESS_MIN_FILES
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    bar = tqdm(total=len(unique), desc="checking training image files", unit="file", disable=not progress, leave=False)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        results = []
        for result in pool.map(check_image_file, unique):
            results.append(result)
            bar.update()
    return results


def validate_image_files(
    paths: Iterable[str | Path],
    progress: bool | None = None,
) -> list[tuple[Path, str]]:
    """``(path, error)`` for every file that cannot be decoded; empty when all are readable."""
    return [(r.path, r.error) for r in inspect_image_files(paths, progress) if r.error is not None]


def unreadable_message(problems: Sequence[tuple[Path, str]]) -> str:
    """The error text for unreadable files: every file by name, then the fix."""
    lines = "\n".join(f"  {path}: {error}" for path, error in problems)
    count = len(problems)
    noun = "file" if count == 1 else "files"
    return (
        f"{count} image {noun} of the dataset cannot be read; training or testing would stop at the first one "
        f"without naming it:\n{lines}\n"
        f"Remove or replace {'this file' if count == 1 else 'these files'} (re-copy or re-export them from the "
        f"source), then run again. Set {SKIP_ENV}=1 to skip this check."
    )


def dataset_files(dataset: object) -> list[Path]:
    """Image and mask paths listed in an anomalib dataset's ``samples`` table."""
    try:
        samples = dataset.samples
    except (AttributeError, RuntimeError):  # not an anomalib dataset, or no samples table yet
        return []
    if samples is None or len(samples) == 0:
        return []
    files = [Path(p) for p in samples["image_path"]]
    if "mask_path" in samples.columns:
        files += [Path(p) for p in samples["mask_path"] if isinstance(p, (str, os.PathLike)) and str(p)]
    return files


def training_source(datamodule: object) -> str:
    """Where a datamodule looks for its normal training images, for error messages."""
    root = getattr(datamodule, "root", None)
    normal_dir = getattr(datamodule, "normal_dir", None)
    if normal_dir is not None:  # anomalib Folder: one path or a list, relative to root
        dirs = normal_dir if isinstance(normal_dir, (list, tuple)) else [normal_dir]
        resolved = [Path(root) / d if root is not None and not Path(d).is_absolute() else Path(d) for d in dirs]
        return ", ".join(str(d) for d in resolved)
    train_data = getattr(datamodule, "train_data", None)
    root_category = getattr(train_data, "root_category", None)
    if root_category is not None:  # MVTecAD, BTech, MPDD, VisA, ...: <root>/<category>/train/<normal>
        return str(Path(root_category) / "train")
    category = getattr(datamodule, "category", None)
    if root is not None:
        return str(Path(root) / category) if category else str(root)
    return f"the training split of {type(datamodule).__name__}"


def check_training_set(datamodule: object) -> None:
    """Raise :class:`EmptyTrainingSetError` when the datamodule's training split has no images."""
    train_data = getattr(datamodule, "train_data", None)
    if train_data is None:
        return
    try:
        size = len(train_data)
    except (TypeError, RuntimeError):  # no samples table yet: nothing to say
        return
    if size:
        return
    source = training_source(datamodule)
    msg = (
        f"the training set is empty: no normal training images were found in {source}. FOD learns from "
        "normal images only: put at least a few defect-free images there (MVTecAD-style datamodules read "
        "'.png' files from <root>/<category>/train/good), or point the datamodule at the right folder "
        "(--data.root / --data.category, or normal_dir for Folder)."
    )
    raise EmptyTrainingSetError(msg)


def check_datamodule(datamodule: object, progress: bool | None = None) -> list[ImageCheck]:
    """Check a set-up anomalib datamodule before training.

    Raises:
        EmptyTrainingSetError: the training split has no images.
        UnreadableImageError: some image or mask files of the train/val/test splits cannot be
            decoded (all of them listed).

    Returns:
        The per-file results (warnings included), or ``[]`` when skipped via ``FOD_SKIP_IMAGE_CHECK``.
    """
    if datamodule is None:
        return []
    check_training_set(datamodule)
    if os.environ.get(SKIP_ENV, "").strip().lower() in {"1", "true", "yes"}:
        return []
    files: list[Path] = []
    for split in SPLITS:
        dataset = getattr(datamodule, f"{split}_data", None)
        if dataset is not None:
            files += dataset_files(dataset)
    results = inspect_image_files(files, progress)
    problems = [(r.path, r.error) for r in results if r.error is not None]
    if problems:
        raise UnreadableImageError(unreadable_message(problems))
    clipped = [r for r in results if r.warning is not None]
    if clipped:
        listing = "\n".join(f"  {r.path}: {r.warning}" for r in clipped[:20])
        more = f"\n  ... and {len(clipped) - 20} more" if len(clipped) > 20 else ""  # noqa: PLR2004
        logger.warning(
            "FOD: %d high-bit-depth image(s) will lose their content when anomalib reads them:\n%s%s\n"
            "Convert them to 8-bit (e.g. scale 16-bit values by 255/65535) before training.",
            len(clipped),
            listing,
            more,
        )
    return results
