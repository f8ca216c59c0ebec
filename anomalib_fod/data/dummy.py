"""A tiny synthetic dataset in MVTec AD layout, for tests and quick smoke runs.

Normal images are one random texture family (smooth low-frequency noise plus oriented
stripes plus pixel noise, slightly varied per image). Defective images are normal images with
one pasted synthetic defect: a ``blob`` (an ellipse of foreign texture, much brighter or darker
than its surroundings) or a ``scratch`` (a thick line segment). The ground-truth mask is
exactly the pasted region.

Layout written under ``root / category``::

    train/good/000.png ...
    test/good/000.png ...
    test/<defect>/000.png ...
    ground_truth/<defect>/000_mask.png ...   (0 / 255, same size as the image)

Example:
    >>> from anomalib.data import MVTecAD
    >>> path = make_dummy_mvtec("/tmp/datasets", n_train=8)  # doctest: +SKIP
    >>> datamodule = MVTecAD(root=path.parent, category=path.name, num_workers=0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFECT_TYPES = ("blob", "scratch")


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise on a coarse ``cells x cells`` grid, values in [0, 1]."""
    coarse = rng.random((cells + 1, cells + 1))
    ys = np.linspace(0, cells, height)
    xs = np.linspace(0, cells, width)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture(rng: np.random.Generator, height: int, width: int, colour: np.ndarray) -> np.ndarray:
    """One normal RGB image ``(H, W, 3)`` in [0, 255] of the shared texture family."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = 0.6 + rng.normal(0.0, 0.05)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / 8.0) + phase)
    base = 0.45 * _smooth_noise(rng, height, width, 4) + 0.35 * stripes + 0.2 * rng.random((height, width))
    brightness = 0.9 + 0.2 * rng.random()
    image = base[..., None] * colour[None, None, :] * brightness
    return np.clip(image, 0, 255)


def _blob_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Boolean ellipse covering roughly 2-8 % of the image, fully inside it."""
    yy, xx = np.mgrid[0:height, 0:width]
    ry = rng.uniform(0.08, 0.16) * height
    rx = rng.uniform(0.08, 0.16) * width
    cy = rng.uniform(ry + 1, height - ry - 1)
    cx = rng.uniform(rx + 1, width - rx - 1)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _scratch_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Boolean thick line segment across part of the image."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    y0, y1 = rng.uniform(0.15, 0.85, size=2) * height
    x0, x1 = rng.uniform(0.1, 0.3) * width, rng.uniform(0.7, 0.9) * width
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / length2, 0.0, 1.0)
    distance = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
    return distance <= max(1.5, 0.03 * min(height, width))


def _paste_defect(
    rng: np.random.Generator,
    image: np.ndarray,
    defect: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste one defect into ``image``; returns the new image and the pasted region."""
    height, width = image.shape[:2]
    mask = _blob_mask(rng, height, width) if defect == "blob" else _scratch_mask(rng, height, width)
    dark = rng.random() < 0.5
    level = rng.uniform(0, 40) if dark else rng.uniform(215, 255)
    foreign = level + rng.normal(0.0, 8.0, size=(height, width, 3))
    out = image.copy()
    out[mask] = np.clip(foreign[mask], 0, 255)
    return out, mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array).astype(np.uint8)).save(path)


def make_dummy_mvtec(
    root: str | Path,
    category: str = "dummy",
    n_train: int = 10,
    n_test_good: int = 4,
    n_test_bad: int = 6,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> Path:
    """Write a small MVTec-AD-layout dataset and return its category folder ``root / category``.

    Use it with ``anomalib.data.MVTecAD(root=path.parent, category=path.name)``.

    Args:
        root: folder that receives the category folder (created if missing).
        category: category folder name.
        n_train: normal training images.
        n_test_good: normal test images.
        n_test_bad: defective test images, spread round-robin over ``defect_types``.
        size: ``(height, width)`` of every image.
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
        defect_types: defect folder names, each ``"blob"`` or ``"scratch"``.

    Returns:
        ``root / category``.
    """
    unknown = [d for d in defect_types if d not in DEFECT_TYPES]
    if unknown or not defect_types:
        msg = f"defect_types must be a non-empty subset of {DEFECT_TYPES}, got {tuple(defect_types)}."
        raise ValueError(msg)
    if min(n_train, n_test_good, n_test_bad) < 0 or n_train == 0:
        msg = "n_train must be positive and the test counts non-negative."
        raise ValueError(msg)
    height, width = size
    rng = np.random.default_rng(seed)
    colour = rng.uniform(120, 255, size=3)
    path = Path(root) / category

    for index in range(n_train):
        _save(_texture(rng, height, width, colour), path / "train" / "good" / f"{index:03d}.png")
    for index in range(n_test_good):
        _save(_texture(rng, height, width, colour), path / "test" / "good" / f"{index:03d}.png")
    counters = dict.fromkeys(defect_types, 0)
    for index in range(n_test_bad):
        defect = defect_types[index % len(defect_types)]
        image, mask = _paste_defect(rng, _texture(rng, height, width, colour), defect)
        stem = f"{counters[defect]:03d}"
        counters[defect] += 1
        _save(image, path / "test" / defect / f"{stem}.png")
        _save(mask.astype(np.uint8) * 255, path / "ground_truth" / defect / f"{stem}_mask.png")
    return path
