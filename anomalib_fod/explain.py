"""``anomalib-fod explain``: the paper's qualitative figure for a trained FOD and an image.

For each image it writes one PNG (matplotlib, Agg) with

- top row: the input image with the chosen token marked; the final anomaly map over the image;
  for that token the learned **intra-correlation** (self-attention) map and its Gaussian
  **target**, and the **inter-correlation** (cross-attention to the reference features) map and
  its target. Maps are the last layer's, averaged over heads, at one level (default: the first,
  stride 8), laid out on the token grid and upsampled (nearest) over the image;
- bottom row, per level: every token's score as the model computes it (see ``anomaly_map.py``): the
  reconstruction score the model's ``reconstruction_term`` makes (by default the residual's Mahalanobis
  distance under the training images' residual statistics; ``MSE + 1 - cos`` with the paper's term), the
  divergence score when the scoring reads one (inter: ``max softmax(-KL) - softmax(-KL)``; intra-only
  models: ``softmax(-KL)``), and the token score the level adds to the map (their product with the
  paper's ``scoring="rec_div"``, the reconstruction score alone with ``Fod``'s default ``"rec"``).

The chosen token is the one under the maximum of the final anomaly map, unless ``--token "[ROW, COL]"``
picks one on the level's token grid. (With ``Fod``'s default ``image_score="position"`` the image score is
the maximum of a second map, of the per-position distances, so its pixel may lie elsewhere.)

Example:
    anomalib-fod explain --checkpoint results/Fod/MVTecAD/bottle/latest/weights/lightning/model.ckpt \\
        --image datasets/MVTecAD/bottle/test/broken_large/000.png --output explanations/

Python::

    from anomalib_fod import Fod
    from anomalib_fod.explain import explain_image, render_explanation
    model = Fod.load_from_checkpoint("model.ckpt")
    render_explanation(explain_image(model, "000.png"), "000_explain.png")
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

if TYPE_CHECKING:
    from anomalib_fod.models.fod.lightning_model import Fod
    from anomalib_fod.models.fod.transformer import BranchStats

PANEL_INCHES = 2.6
DEFAULT_DPI = 100
COLUMNS = 6
OVERLAY_ALPHA = 0.55
CORRELATION_PANELS = ("intra attention", "intra target", "inter attention", "inter target")


@dataclass
class Explanation:
    """Everything the figure shows, as numpy arrays.

    Attributes:
        path: the image file.
        image: ``(H, W, 3)`` image in ``[0, 1]`` at the model's input size (resized, not normalised).
        anomaly_map: ``(H, W)`` raw (un-normalised) final anomaly map.
        pred_score: the model's raw image score (the anomaly map's maximum, or with ``image_score="position"``
            that of the per-position distances' map).
        level: level whose correlation maps are shown.
        token: ``(row, col)`` of the chosen query token on that level's grid.
        grids: ``(h_i, w_i)`` token grid of every level.
        correlations: ``CORRELATION_PANELS`` name -> ``(h, w)`` map of the chosen token's
            correlations over the key positions (rows sum to 1); absent when the branch is off.
        components: per level ``{"rec": (h_i, w_i), "div": ..., "context": ..., "score": ...}`` token scores
            (``div``/``rec`` absent when the scoring mode does not use them).
        div_name: ``"inter-score"`` or ``"intra-score"``.
        fine_map: ``(H, W)`` the fine map level's part of the anomaly map (``fine_map_weight``; before the blur,
            in the map's units); ``None`` without the level.
        aligned_map: ``(H, W)`` the aligned map level's part of the anomaly map (``aligned_map_weight``; likewise);
            ``None`` where it takes no part.
    """

    path: Path
    image: np.ndarray
    anomaly_map: np.ndarray
    pred_score: float
    level: int
    token: tuple[int, int]
    grids: list[tuple[int, int]]
    correlations: dict[str, np.ndarray] = field(default_factory=dict)
    components: list[dict[str, np.ndarray]] = field(default_factory=list)
    div_name: str = "inter-score"
    fine_map: np.ndarray | None = None
    aligned_map: np.ndarray | None = None


def load_image(path: str | Path) -> torch.Tensor:
    """``(3, H, W)`` float RGB in ``[0, 1]``, read exactly as anomalib's datasets read training images."""
    from anomalib.data.utils import read_image  # noqa: PLC0415

    return read_image(path, as_tensor=True)


def _display_image(image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return resized.clamp(0, 1).permute(1, 2, 0).numpy()


def _key_map(row: torch.Tensor, grid: tuple[int, int], positions: torch.Tensor | None) -> np.ndarray:
    """One query's ``(S,)`` correlations -> ``(h, w)`` map over the key positions.

    Keys on the full row-major grid (intra; mean references) are reshaped. Keys at arbitrary
    positions (coreset references) are added up at their nearest grid cell.
    """
    from anomalib_fod.models.fod.transformer import grid_coordinates  # noqa: PLC0415

    height, width = grid
    on_grid = positions is None or (
        positions.shape[0] == height * width and torch.equal(positions, grid_coordinates(height, width))
    )
    if on_grid:
        return row.reshape(height, width).numpy()
    cells = positions.round().long()
    cells[:, 0].clamp_(0, height - 1)
    cells[:, 1].clamp_(0, width - 1)
    out = torch.zeros(height * width, dtype=row.dtype)
    out.index_add_(0, cells[:, 0] * width + cells[:, 1], row)
    return out.reshape(height, width).numpy()


def _branch_maps(stats: BranchStats, query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged ``(S,)`` attention and target rows of one query (batch element 0)."""
    if stats.maps is None:
        msg = "correlation maps were not kept: call the levels with keep_maps=True."
        raise RuntimeError(msg)
    attention, target = stats.maps
    return attention[0, :, query].float().mean(dim=0), target[0, :, query].float().mean(dim=0)


def _check_token(token: Sequence[int], grid: tuple[int, int], level: int) -> tuple[int, int]:
    row, col = (int(v) for v in token)
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        msg = (
            f"token ({row}, {col}) is outside level {level}'s {grid[0]}x{grid[1]} token grid: "
            f"use 0 <= row < {grid[0]} and 0 <= col < {grid[1]}."
        )
        raise ValueError(msg)
    return row, col


@torch.no_grad()
def explain_image(
    model: Fod,
    path: str | Path,
    token: Sequence[int] | None = None,
    level: int = 0,
) -> Explanation:
    """Compute the maps of the qualitative figure for one image.

    Args:
        model: a trained ``Fod`` (with reference features unless the inter branch is off).
        path: image file (any format anomalib reads).
        token: ``(row, col)`` on level ``level``'s token grid; ``None``: the token under the
            maximum of the final anomaly map.
        level: which level's correlation maps to show (0: stride 8, 1: stride 16).

    Puts ``model`` in eval mode.

    Raises:
        ValueError: ``level`` or ``token`` out of range.
    """

    fod = model.model
    if not 0 <= level < len(fod.levels):
        msg = f"level must be in [0, {len(fod.levels) - 1}], got {level}."
        raise ValueError(msg)
    model.eval()
    device = next(fod.parameters()).device
    image = load_image(path)
    batch = image[None].to(device)
    if model.pre_processor is not None and getattr(model.pre_processor, "transform", None) is not None:
        batch = model.pre_processor.transform(batch)
    size = (int(batch.shape[-2]), int(batch.shape[-1]))

    features = fod.extract_map_features(batch)
    run = fod.run_levels(features.levels, keep_maps=True)
    tokens, outputs, grids = run.tokens, run.levels, run.grids
    generator = fod.anomaly_map_generator
    scores = generator.level_scores(tokens, outputs, grids)  # one context-predictor pass per level, if any
    # the map-only levels' parts, computed once: shown apart and added to the map
    aligned_share = generator.aligned_share(features.finest, size)
    fine_share = generator.fine_share(features.finer, size)
    parts = [part for part in (aligned_share, fine_share) if part is not None]
    added = sum(parts[1:], parts[0]) if parts else None
    anomaly_map, pred_score = generator.combine(scores, grids, size, added=added)
    components = []
    for index, (level_tokens, level_output, (height, width)) in enumerate(zip(tokens, outputs, grids, strict=True)):
        # The level index picks that level's residual statistics (the whitened residual).
        parts = {"score": scores.map[index]}
        if generator.scoring != "div":
            parts["rec"] = generator.reconstruction_score(level_tokens, level_output, index)
        if scores.context is not None:
            parts["context"] = scores.context[index]
        if scores.nearest is not None:
            parts["nearest"] = scores.nearest[index]
        if generator.scoring != "rec":
            parts["div"] = generator.divergence_score(level_output)
        components.append({k: v[0].reshape(height, width).float().cpu().numpy() for k, v in parts.items()})
    anomaly_map = anomaly_map[0, 0].float().cpu()

    grid = grids[level]
    if token is None:
        flat = int(anomaly_map.argmax())
        row_px, col_px = divmod(flat, size[1])
        token = (row_px * grid[0] // size[0], col_px * grid[1] // size[1])
    row, col = _check_token(token, grid, level)
    query = row * grid[1] + col

    correlations: dict[str, np.ndarray] = {}
    output = outputs[level]
    transformer = fod.levels[level]
    if output.intra:
        attention, target = _branch_maps(output.intra[-1], query)
        correlations["intra attention"] = _key_map(attention.cpu(), grid, None)
        correlations["intra target"] = _key_map(target.cpu(), grid, None)
    if output.inter:
        attention, target = _branch_maps(output.inter[-1], query)
        positions = transformer.ref_positions.float().cpu()
        correlations["inter attention"] = _key_map(attention.cpu(), grid, positions)
        correlations["inter target"] = _key_map(target.cpu(), grid, positions)

    return Explanation(
        path=Path(path),
        image=_display_image(image, size),
        anomaly_map=anomaly_map.numpy(),
        pred_score=float(pred_score[0]),
        level=level,
        token=(row, col),
        grids=grids,
        correlations=correlations,
        components=components,
        div_name="inter-score" if generator.with_inter else "intra-score",
        fine_map=None if fine_share is None else fine_share[0, 0].float().cpu().numpy(),
        aligned_map=None if aligned_share is None else aligned_share[0, 0].float().cpu().numpy(),
    )


def _rows(explanation: Explanation) -> int:
    """Panel rows: the image, map and correlations; the score components; the fine level, where there is one."""
    return 2 if explanation.fine_map is None and explanation.aligned_map is None else 3


def figure_size(explanation: Explanation, dpi: int = DEFAULT_DPI) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`render_explanation` writes."""
    rows = _rows(explanation)
    height, width = explanation.image.shape[:2]
    aspect = height / width
    # each image panel is about 0.7 of its column (the colour bar takes the rest), plus a title line
    return round(COLUMNS * PANEL_INCHES * dpi), round(rows * (0.7 * PANEL_INCHES * aspect + 0.5) * dpi)


def _second_panel(parts: dict[str, np.ndarray], div_name: str) -> tuple[str, str]:
    """The key and title of a level's second panel: the score added to the residual's, or the divergence."""
    if "context" in parts:
        return "context", "context (z-units)"
    if "nearest" in parts:
        return "nearest", "nearest token (z-units)"
    return "div", div_name


def render_explanation(explanation: Explanation, output: str | Path, dpi: int = DEFAULT_DPI) -> Path:
    """Draw the figure and save it as PNG; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    width_px, height_px = figure_size(explanation, dpi)
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(_rows(explanation), COLUMNS, squeeze=False)
    image = explanation.image
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    grid = explanation.grids[explanation.level]
    row, col = explanation.token
    cell_h, cell_w = height / grid[0], width / grid[1]

    def mark(axis) -> None:  # noqa: ANN001
        axis.add_patch(
            Rectangle((col * cell_w, row * cell_h), cell_w, cell_h, fill=False, edgecolor="lime", linewidth=1.5),
        )

    def overlay(axis, values: np.ndarray, title: str, marked: bool = True) -> None:  # noqa: ANN001
        axis.imshow(image.mean(axis=-1), cmap="gray", extent=extent, vmin=0, vmax=1)
        shown = axis.imshow(values, cmap="jet", alpha=OVERLAY_ALPHA, extent=extent, interpolation="nearest")
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
        if marked:
            mark(axis)
        axis.set_title(title, fontsize=8)

    axes[0, 0].imshow(image, extent=extent)
    mark(axes[0, 0])
    axes[0, 0].set_title(f"{explanation.path.name}\ntoken ({row}, {col}) of level {explanation.level}", fontsize=8)
    overlay(axes[0, 1], explanation.anomaly_map, f"anomaly map (score {explanation.pred_score:.4g})")
    axes[0, 1].images[-1].set_interpolation("bilinear")
    for axis, name in zip(axes[0, 2:], CORRELATION_PANELS, strict=True):
        if name in explanation.correlations:
            overlay(axis, explanation.correlations[name], f"{name} (last layer, head mean)")
        else:
            axis.text(0.5, 0.5, f"{name}\n(branch off)", ha="center", va="center", fontsize=8)
    # With the context or nearest-token score its z-units take the divergence's panel (the score then reads no
    # divergence).
    panels = [
        (level, key, title)
        for level, parts in enumerate(explanation.components)
        for key, title in (
            ("rec", "rec score"),
            _second_panel(parts, explanation.div_name),
            ("score", "rec x div"),
        )
    ]
    for axis, (level, key, title) in zip(axes[1], panels, strict=False):
        values = explanation.components[level].get(key)
        if values is None:
            axis.text(0.5, 0.5, f"level {level} {title}\n(not used by scoring)", ha="center", va="center", fontsize=8)
            continue
        if key == "score" and "rec" in explanation.components[level] and "div" in explanation.components[level]:
            title = f"rec x {explanation.div_name}"
        elif key == "score":
            title = "token score"
        overlay(axis, values, f"level {level}: {title}", marked=level == explanation.level)
    if _rows(explanation) == 3:  # noqa: PLR2004 - a third row: the map-only levels' parts, the rest of the row empty
        shown = [
            (values, f"{name} level (map part,\nbefore the blur)")
            for values, name in ((explanation.aligned_map, "aligned"), (explanation.fine_map, "fine"))
            if values is not None
        ]
        for axis, (values, title) in zip(axes[2], shown, strict=False):
            overlay(axis, values, title, marked=False)
        for axis in axes[2, len(shown):]:
            axis.set_axis_off()
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.subplots_adjust(left=0.01, right=0.97, top=0.92, bottom=0.02, wspace=0.35, hspace=0.25)
    figure.savefig(output, dpi=dpi)
    return output


def output_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>_explain.png`` per image; ``<folder>_<stem>`` where stems repeat, then an index if still needed."""
    stems = [p.stem for p in paths]
    names = [stem if stems.count(stem) == 1 else f"{p.parent.name}_{stem}" for p, stem in zip(paths, stems, strict=True)]
    return [
        f"{name}_explain.png" if names.count(name) == 1 else f"{name}_{index}_explain.png"
        for index, name in enumerate(names)
    ]


def explain(
    checkpoint: Path,
    image: Path | list[Path],
    output: Path = Path("explanations"),
    token: tuple[int, int] | None = None,
    level: int = 0,
    device: str = "cpu",
    dpi: int = DEFAULT_DPI,
) -> int:
    """Write FOD's qualitative figure for each image.

    The figure shows the anomaly map, the intra- and inter-correlations of one token with their
    Gaussian targets, the per-level score components and, with ``fine_map_weight``, the fine level's part of
    the map.

    Args:
        checkpoint: trained FOD checkpoint (.ckpt).
        image: an image file, or a list of them (``"[a.png, b.png]"``).
        output: output folder.
        token: query token (row, column) on the level's grid (default: the token under the anomaly
            map's maximum).
        level: level of the correlation maps (0: stride 8).
        device: torch device.
        dpi: figure resolution.

    Returns:
        0 when every figure was written, 1 when some image failed, 2 for missing files.
    """
    if not checkpoint.is_file():
        print(f"explain: checkpoint {checkpoint} not found.", file=sys.stderr)
        return 2
    images = [image] if isinstance(image, Path) else list(image)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        print(f"explain: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    from anomalib_fod import Fod  # noqa: PLC0415

    model = Fod.load_from_checkpoint(checkpoint, map_location=device).to(device)
    status = 0
    for path, name in zip(images, output_names(images), strict=True):
        try:
            explanation = explain_image(model, path, token, level)
        except (OSError, ValueError) as error:
            print(f"explain: {path}: {error}", file=sys.stderr)
            status = 1
            continue
        written = render_explanation(explanation, output / name, dpi)
        print(f"{path}: score {explanation.pred_score:.6g}, token {explanation.token} -> {written}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalib-fod explain`` with command-line ``argv``; returns the exit status."""
    from anomalib_fod.cli import run_command  # noqa: PLC0415

    return run_command("explain", argv)


if __name__ == "__main__":
    sys.exit(main())
