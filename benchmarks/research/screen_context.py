"""Screen: a context predictor (each token from its surroundings, never from itself) against the whitened distance.

Research probe (cached features, no Lightning). FOD's reconstruction sees the token it reconstructs (through the
residual connections), so its residual is nearly the token's own deviation and the whitened residual equals the
input features' whitened distance. Here the token is predicted from the others only: per level, a query stream that
starts from a learned vector plus the 2D sin-cos position cross-attends (every layer) to the whitened tokens, with
every token within ``--radius`` grid cells of the query masked out (the features are 3x3 average-pooled, so radius 1
would still see the token's own pixels). The residual "token minus what its surroundings say" is then whitened
against the training images' residuals, as the default score is.

Rows per step (step 0: the untrained predictor, i.e. the learning gain's reference):
- ``feat_blend``: the input tokens' whitened distance (shared and per-position, averaged; nothing learned);
- ``ctx_blend``: the same distance of the context residual;
- ``sum_z``: both in the training images' per-position z-units, added;
- ``sum_g``: both in the level's z-units (one mean and std over every training token of the level), added;
- ``min_z``: the smaller of the two per-position z-scores (both views must call the token unusual);
- ``lsq_blend``: the distance of ``x - B p``, the prediction ``p`` mapped by least squares onto the training tokens
  (so a predictor that explains nothing leaves the input features' distance); with ``--hide-outliers`` also
  ``lsq_blend_hidden`` and ``lsq_hidden_fodimage``;
- with ``--hide-outliers``, ``ctx_blend_hidden`` / ``sum_z_hidden`` / ``sum_g_hidden`` / ``min_z_hidden`` /
  ``min_g_hidden``: the same, with each test image's most unusual
  tokens (``--hide-share`` of them, by their own whitened distance) hidden from every query, so that a defect does
  not spoil its neighbours' predictions; and ``feat_fodimage`` / ``ctx_hidden_fodimage`` / ``sum_z_hidden_fodimage`` /
  ``min_z_hidden_fodimage``: the maps of ``feat_blend`` / ``ctx_blend_hidden`` / ``sum_z_hidden`` / ``min_z_hidden`` with ``Fod()``'s image rule (the image score
  from the distances under each position's own covariance, in per-position z-units for the sum, levels averaged).
Nothing is chosen on test labels.

    python benchmarks/research/screen_context.py --data bottle=<datasets>/mvtec_ad:bottle --image-size 128 128 \\
        --seeds 0 --steps 0,500,2000 --out results/screen/context_128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from screen import (  # noqa: E402
    _mahalanobis,
    _position_mahalanobis,
    _position_precision,
    _precision,
    mvtec_datamodule,
    parse_data,
    scaled,
    token_whitening,
)
from screen_discriminator import whitened_tokens  # noqa: E402


def sincos_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """``(h * w, dim)`` 2D sine-cosine position codes (half the channels per axis)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for axis in (ys.flatten(), xs.flatten()):
        angles = axis[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def neighbourhood_mask(height: int, width: int, radius: int) -> torch.Tensor:
    """``(L, L)`` bool, True where key ``j`` lies within ``radius`` cells (Chebyshev) of query ``i``: not attended."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)


class ContextPredictor(nn.Module):
    """``(B, L, C)`` whitened tokens -> ``(B, L, C)`` each token predicted from the tokens outside its neighbourhood."""

    def __init__(self, channels: int, grid: tuple[int, int], radius: int, dim: int = 128, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.register_buffer("positions", sincos_positions(*grid, dim))
        self.register_buffer("mask", neighbourhood_mask(*grid, radius))
        self.embed = nn.Linear(channels, dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.attention = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                 for _ in range(layers))
        self.out = nn.Linear(dim, channels)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden``: ``(B, L)`` bool, tokens no query may read (e.g. suspected defects). ``queries``: ``(Q,)``
        positions to predict (default: all); the queries never read each other, so a subset is exact for them."""
        positions, mask = self.positions, self.mask
        if queries is not None:
            positions, mask = positions[queries], mask[queries]
        memory = self.embed(tokens) + self.positions
        query = (self.query + positions).expand(tokens.shape[0], -1, -1)
        for index, (attention, ffn) in enumerate(zip(self.attention, self.ffn, strict=True)):
            attended, _ = attention(self.norms[2 * index](query), memory, memory, attn_mask=mask,
                                    key_padding_mask=hidden, need_weights=False)
            query = query + attended
            query = query + ffn(self.norms[2 * index + 1](query))
        return self.out(query)


class Distance:
    """The default score's form on ``(N, L, C)`` samples: mean of the shared and per-position Mahalanobis distances,
    and its training images' per-position mean and std (the z-units)."""

    def __init__(self, train: torch.Tensor) -> None:
        self.mean = train.mean(dim=0)
        centred = train - self.mean
        self.shared = _precision(centred.flatten(0, 1))
        self.position = _position_precision(centred, torch.linalg.inv(self.shared.double()).float())
        own = self(train)
        self.z_mean, self.z_std = own.mean(dim=0), own.std(dim=0) + 1e-6
        self.g_mean, self.g_std = own.mean(), own.std() + 1e-6
        own = self.at_position(train)
        self.p_mean, self.p_std = own.mean(dim=0), own.std(dim=0) + 1e-6

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        centred = samples - self.mean
        return 0.5 * (_mahalanobis(centred, self.shared) + _position_mahalanobis(centred, self.position))

    def z(self, samples: torch.Tensor) -> torch.Tensor:
        return (self(samples) - self.z_mean) / self.z_std

    def at_position(self, samples: torch.Tensor) -> torch.Tensor:
        """The distance under each position's own covariance alone (what ``Fod()``'s image score reads)."""
        return _position_mahalanobis(samples - self.mean, self.position)

    def zp(self, samples: torch.Tensor) -> torch.Tensor:
        return (self.at_position(samples) - self.p_mean) / self.p_std

    def g(self, samples: torch.Tensor) -> torch.Tensor:
        """In the level's units: one mean and std over every training token (no per-position noise)."""
        return (self(samples) - self.g_mean) / self.g_std


class PredictionCalibration:
    """``x - B p``: the least-squares map ``B`` of ``(N, L, C)`` predictions ``p`` onto the tokens ``x``, pooled over
    positions and fitted on the training tokens (ridge 1e-3 of the predictions' mean variance)."""

    def __init__(self, tokens: torch.Tensor, predictions: torch.Tensor) -> None:
        x, p = tokens.flatten(0, 1).double(), predictions.flatten(0, 1).double()
        x, p = x - x.mean(dim=0), p - p.mean(dim=0)
        pp, xp = p.T @ p / len(p), x.T @ p / len(p)
        ridge = 1e-3 * pp.trace() / pp.shape[0]
        self.map = torch.linalg.solve(pp + ridge * torch.eye(pp.shape[0], dtype=pp.dtype), xp.T).T.float()
        # The share of the tokens' variance the calibrated prediction explains (0: it uses nothing of it).
        self.used = float(1 - (x - p @ self.map.double().T).square().sum() / x.square().sum())

    def residual(self, tokens: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        return tokens - predictions @ self.map.T


@torch.no_grad()
def predict(
    predictors: list[ContextPredictor], tokens: list[torch.Tensor], hidden: list[torch.Tensor] | None = None,
    batch: int = 32,
) -> list[torch.Tensor]:
    hidden = hidden or [None] * len(tokens)
    return [
        torch.cat([p(t[s : s + batch], None if h is None else h[s : s + batch]) for s in range(0, t.shape[0], batch)])
        for p, t, h in zip(predictors, tokens, hidden, strict=True)
    ]


# Features per dataset, extracted once per process: they do not depend on the seed (a frozen backbone).
_FEATURES: dict[str, tuple[list[torch.Tensor], dict]] = {}


@dataclass
class Prepared:
    """One dataset's whitened tokens per level, the input features' distance, and what scoring needs."""

    generator: Any  # the model's AnomalyMapGenerator (its level combination and map weights)
    train_tokens: list[torch.Tensor]  # (N * gains, L_i, C_i)
    test_tokens: list[torch.Tensor]
    grids: list[tuple[int, int]]
    feature_distance: list[Distance]
    test: dict
    labels: Any
    masks: Any


def prepare(args: argparse.Namespace, name: str, root: Path, category: str, seed: int) -> Prepared:
    """Features (cached per process), whitening and the input features' distance; seeds the RNG with ``seed``
    last, so the predictors' start depends on the seed alone, not on what ran before."""
    from convergence_probe import cache_features  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415

    torch.manual_seed(seed)
    model = Fod(image_size=tuple(args.image_size), visualizer=False)
    if name not in _FEATURES:
        datamodule = mvtec_datamodule(root, category)
        gained = [cache_features(model, scaled(datamodule.train_dataloader(), gain), f"{name}: x{gain}")["features"]
                  for gain in args.gains]
        _FEATURES[name] = gained, cache_features(model, datamodule.test_dataloader(), f"{name}: test images")
    gained, test = _FEATURES[name]
    torch.manual_seed(seed)
    train_features = [torch.cat([g[level] for g in gained]) for level in range(len(gained[0]))]
    whitenings = [token_whitening(f) for f in train_features]
    train_tokens = [whitened_tokens(f, *w) for f, w in zip(train_features, whitenings, strict=True)]
    return Prepared(
        generator=model.model.anomaly_map_generator,
        train_tokens=train_tokens,
        test_tokens=[whitened_tokens(f, *w) for f, w in zip(test["features"], whitenings, strict=True)],
        grids=[(int(f.shape[-2]), int(f.shape[-1])) for f in train_features],
        feature_distance=[Distance(t) for t in train_tokens],
        test=test,
        labels=test["labels"].numpy(),
        masks=test["masks"].numpy() if test["masks"] is not None else None,
    )


def run_resumable(args: argparse.Namespace, run: Any) -> None:  # noqa: ANN401 - run_one of a screen
    """``run(args, name, root, category, seed, rows)`` for every seed and dataset whose last step is not yet in
    ``args.out``'s rows: a killed run repeats only its unfinished (dataset, seed) pairs."""
    args.out.mkdir(parents=True, exist_ok=True)
    rows = args.out / "rows.jsonl"
    last = max(int(v) for v in args.steps.split(","))
    done = {(r["dataset"], r["seed"]) for r in map(json.loads, rows.read_text().splitlines() if rows.exists() else [])
            if r["step"] == last}
    for seed in args.seeds:
        for name, root, category in args.data:
            if (name, seed) in done:
                print(f"{name} seed {seed}: step {last} already in {rows}, skipped")
                continue
            run(args, name, root, category, seed, rows)


def run_one(args: argparse.Namespace, name: str, root: Path, category: str, seed: int, rows: Path) -> None:
    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415

    data = prepare(args, name, root, category, seed)
    generator, train_tokens, test_tokens, grids = data.generator, data.train_tokens, data.test_tokens, data.grids
    feature_distance, test, labels, masks = data.feature_distance, data.test, data.labels, data.masks
    weights = generator.map_level_weights

    def metrics(token_scores: list[torch.Tensor]) -> dict[str, float]:
        maps, scores = generator.combine_levels(token_scores, grids, test["size"], weights)
        return {"image_auroc": image_auroc(scores.numpy(), labels),
                "pixel_auroc": pixel_auroc(maps[:, 0].numpy(), masks) if masks is not None else math.nan}

    def write(step: int, candidate: str, row: dict[str, float], seconds: float) -> None:
        with rows.open("a") as handle:
            handle.write(json.dumps({"dataset": name, "seed": seed, "step": step, "candidate": candidate,
                                     "radius": args.radius, "cross_fit": args.cross_fit,
                                     "query_share": args.query_share, "image_size": list(args.image_size),
                                     "train_seconds": round(seconds, 1), **row}) + "\n")

    feat_scores = [d(t) for d, t in zip(feature_distance, test_tokens, strict=True)]
    feat_z = [d.z(t) for d, t in zip(feature_distance, test_tokens, strict=True)]
    # Cross-fitting: two predictors, each trained on half of the training rows; each half's residual statistics come
    # from the other half's predictor, so they see a normal image's residual more as a test image sees it. The
    # halves are by row, and the loader shuffles each exposure's pass anew, so an image's exposures may straddle them.
    images = train_tokens[0].shape[0] // len(args.gains)
    folds = 2 if args.cross_fit else 1
    fold_of_row = torch.arange(train_tokens[0].shape[0]) % images % folds
    fold_rows = [torch.nonzero(fold_of_row == f).flatten() for f in range(folds)]
    members = [[ContextPredictor(t.shape[-1], g, args.radius) for t, g in zip(train_tokens, grids, strict=True)]
               for _ in range(folds)]
    optimizer = torch.optim.Adam([p for m in members for level in m for p in level.parameters()], lr=args.lr)
    index_gen = torch.Generator().manual_seed(seed)
    step, seconds = 0, 0.0
    for target in sorted({int(v) for v in args.steps.split(",")}):
        start = time.perf_counter()
        for m in (level for member in members for level in member):
            m.train()
        while step < target:
            loss = 0.0
            for member, rows_of_fold in zip(members, fold_rows, strict=True):
                index = rows_of_fold[torch.randint(len(rows_of_fold), (args.batch,), generator=index_gen)]
                for m, t in zip(member, train_tokens, strict=True):
                    if args.query_share >= 1:  # every position (and the random stream of the earlier screens)
                        loss = loss + (m(t[index]) - t[index]).square().mean()
                        continue
                    length = t.shape[1]
                    queries = torch.randperm(length, generator=index_gen)[: math.ceil(args.query_share * length)]
                    loss = loss + (m(t[index], queries=queries) - t[index][:, queries]).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        seconds += time.perf_counter() - start
        for m in (level for member in members for level in member):
            m.eval()
        train_residual = [t.clone() for t in train_tokens]
        for f, rows_of_fold in enumerate(fold_rows):
            scorer = members[(f + 1) % folds]  # the other half's predictor (the same one without cross-fitting)
            for level, prediction in enumerate(predict(scorer, [t[rows_of_fold] for t in train_tokens])):
                train_residual[level][rows_of_fold] -= prediction
        test_predictions = [predict(member, test_tokens) for member in members]
        test_residual = [t - sum(p[level] for p in test_predictions) / folds for level, t in enumerate(test_tokens)]
        context_distance = [Distance(r) for r in train_residual]
        ctx_scores = [d(r) for d, r in zip(context_distance, test_residual, strict=True)]
        sum_z = [fz + d.z(r) for fz, d, r in zip(feat_z, context_distance, test_residual, strict=True)]
        explained = [1 - float(r.square().mean() / t.square().mean()) for r, t in zip(train_residual, train_tokens,
                                                                                       strict=True)]
        sum_g = [fd.g(t) + d.g(r) for fd, t, d, r in zip(feature_distance, test_tokens, context_distance, test_residual,
                                                         strict=True)]
        ctx_z = [d.z(r) for d, r in zip(context_distance, test_residual, strict=True)]
        # Both views must agree: the smaller of the two z-scores. A pose the per-position Gaussian has not seen
        # is high in feat_z only, a ring of spoiled predictions around a defect is high in ctx_z only.
        min_z = [torch.minimum(fz, cz) for fz, cz in zip(feat_z, ctx_z, strict=True)]
        outputs = [("feat_blend", feat_scores), ("ctx_blend", ctx_scores), ("sum_z", sum_z), ("sum_g", sum_g),
                   ("min_z", min_z)]
        # The prediction taken only as far as it explains the training tokens: a least-squares map of the prediction
        # onto the token, fitted on the training tokens, so that a predictor that knows nothing leaves the token's
        # own deviation (the input features' distance) and one that knows a direction removes what it knows there.
        calibrations = [PredictionCalibration(t, t - r) for t, r in zip(train_tokens, train_residual, strict=True)]
        lsq_distance = [Distance(c.residual(t, t - r)) for c, t, r in zip(calibrations, train_tokens, train_residual,
                                                                            strict=True)]
        outputs.append(("lsq_blend", [d(c.residual(t, t - r)) for d, c, t, r in zip(
            lsq_distance, calibrations, test_tokens, test_residual, strict=True)]))
        used = [round(c.used, 4) for c in calibrations]
        if args.hide_outliers:
            # A defect must not explain its neighbours: no query reads the image's own most unusual tokens (those
            # above the image's --hide-share quantile of its tokens' whitened distance in z-units). A bound from the
            # training tokens would not do: in-sample, per-position statistics make them look closer than any
            # normal test token (measured: 19 % and 66 % of battery_weld's test tokens beyond the training maximum).
            hidden = [z >= z.quantile(1 - args.hide_share, dim=1, keepdim=True) for z in feat_z]
            hidden_predictions = [predict(member, test_tokens, hidden) for member in members]
            hidden_residual = [t - sum(p[level] for p in hidden_predictions) / folds
                               for level, t in enumerate(test_tokens)]
            outputs += [("ctx_blend_hidden", [d(r) for d, r in zip(context_distance, hidden_residual, strict=True)]),
                        ("sum_z_hidden", [fz + d.z(r) for fz, d, r in zip(feat_z, context_distance, hidden_residual,
                                                                          strict=True)]),
                        ("sum_g_hidden", [fd.g(t) + d.g(r) for fd, t, d, r in zip(feature_distance, test_tokens,
                                                                               context_distance, hidden_residual,
                                                                               strict=True)])]
            outputs.append(("min_z_hidden", [torch.minimum(fz, d.z(r)) for fz, d, r in zip(
                feat_z, context_distance, hidden_residual, strict=True)]))
            outputs.append(("min_g_hidden", [torch.minimum(fd.g(t), d.g(r)) for fd, t, d, r in zip(
                feature_distance, test_tokens, context_distance, hidden_residual, strict=True)]))
            lsq_hidden = [c.residual(t, t - r) for c, t, r in zip(calibrations, test_tokens, hidden_residual,
                                                                   strict=True)]
            outputs.append(("lsq_blend_hidden", [d(r) for d, r in zip(lsq_distance, lsq_hidden, strict=True)]))
            print(f"{name}: hidden test tokens per level {[round(float(h.float().mean()), 4) for h in hidden]}")
            # Fod()'s image rule: the image score from the per-position distances with the levels averaged
            # equally (the map, and so the pixel AUROC, stays the candidate's own).
            by_name = dict(outputs)
            for candidate, source, image_tokens in (
                ("feat_fodimage", "feat_blend", [fd.at_position(t) for fd, t in zip(feature_distance, test_tokens,
                                                                                     strict=True)]),
                ("ctx_hidden_fodimage", "ctx_blend_hidden",
                 [d.at_position(r) for d, r in zip(context_distance, hidden_residual, strict=True)]),
                ("sum_z_hidden_fodimage", "sum_z_hidden",
                 [fd.zp(t) + d.zp(r) for fd, t, d, r in zip(feature_distance, test_tokens, context_distance,
                                                           hidden_residual, strict=True)]),
                ("lsq_hidden_fodimage", "lsq_blend_hidden",
                 [d.at_position(r) for d, r in zip(lsq_distance, lsq_hidden, strict=True)]),
                ("min_z_hidden_fodimage", "min_z_hidden",
                 [torch.minimum(fd.zp(t), d.zp(r)) for fd, t, d, r in zip(feature_distance, test_tokens,
                                                                        context_distance, hidden_residual,
                                                                        strict=True)]),
            ):
                scores = generator.combine_levels(image_tokens, grids, test["size"])[1]
                outputs.append((candidate, by_name[source], image_auroc(scores.numpy(), labels)))
        for candidate, token_scores, *image in outputs:
            row = metrics(token_scores)
            if image:
                row["image_auroc"] = image[0]
            write(step, candidate, {**row, "explained": [round(e, 4) for e in explained], "used": used}, seconds)
        print(f"{name} seed {seed} step {step} ({seconds:.0f} s), explained {explained}", flush=True)


def step_seconds(grids: list[tuple[int, int]], channels: tuple[int, ...], radius: int, batch: int,
                 repeats: int = 5, query_share: float = 1.0) -> float:
    """Median seconds of one training step of every level's predictor on random tokens (after one warm-up step),
    predicting ``query_share`` of each level's positions."""
    predictors = [ContextPredictor(c, g, radius) for c, g in zip(channels, grids, strict=True)]
    optimizer = torch.optim.Adam([p for m in predictors for p in m.parameters()], lr=1e-3)
    tokens = [torch.randn(batch, g[0] * g[1], c) for c, g in zip(channels, grids, strict=True)]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = 0.0
        for m, t in zip(predictors, tokens, strict=True):
            queries = torch.randperm(t.shape[1])[: math.ceil(query_share * t.shape[1])]
            loss = loss + (m(t, queries=queries) - t[:, queries]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def _read_runs(rows_files: list[Path]) -> dict[tuple[str, str, int], dict[int, tuple[float, float]]]:
    """Per (candidate, dataset, seed): the (image, pixel) AUROC at each step of ``rows_files``' rows."""
    runs: dict[tuple[str, str, int], dict[int, tuple[float, float]]] = {}
    for rows_file in rows_files:
        for line in rows_file.read_text().splitlines():
            row = json.loads(line)
            runs.setdefault((row["candidate"], row["dataset"], row["seed"]), {})[row["step"]] = (
                row["image_auroc"], row["pixel_auroc"])
    return runs


def _seed_gains(runs: dict[tuple[str, str, int], dict[int, tuple[float, float]]], last: int,
                reference: int = 0) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Per (candidate, dataset): each seed's (image, pixel) AUROC at step ``last`` minus at ``reference``, for the
    seeds that reached both."""
    gains: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (candidate, dataset, _), by_step in runs.items():
        if reference in by_step and last in by_step:
            gains.setdefault((candidate, dataset), []).append(
                (by_step[last][0] - by_step[reference][0], by_step[last][1] - by_step[reference][1]))
    return gains


def report(folders: list[Path], reference: int = 0) -> str:
    """Markdown: per candidate and dataset, AUROC at every step (mean ± std over seeds) and the learning gain (the
    last step minus ``reference`` of the same seed), then each candidate's mean gain and lowest dataset."""
    import statistics  # noqa: PLC0415

    runs = _read_runs([folder / "rows.jsonl" for folder in folders])
    datasets = sorted({d for _, d, _ in runs})
    steps = sorted({step for by_step in runs.values() for step in by_step})
    candidates = list(dict.fromkeys(c for c, _, _ in runs))
    gains_of = _seed_gains(runs, steps[-1], reference)

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"

    lines = ["| score | steps | " + " | ".join(datasets) + " |", "|---|---|" + "---|" * len(datasets)]
    summary = []
    for candidate in candidates:
        for step in steps:
            parts = []
            for dataset in datasets:
                seeds = [by_step[step] for (c, d, _), by_step in runs.items()
                         if c == candidate and d == dataset and step in by_step]
                parts.append(" / ".join(spread([v[k] for v in seeds]) for k in (0, 1)) if seeds else "-")
            lines.append(f"| `{candidate}` | {step} | " + " | ".join(parts) + " |")
        gains, parts = [], []
        for dataset in datasets:
            seeds = gains_of.get((candidate, dataset))
            if not seeds:
                parts.append("-")
                continue
            gain = [[g[k] for g in seeds] for k in (0, 1)]
            gains.append([statistics.mean(g) for g in gain])
            parts.append(" / ".join(f"{statistics.mean(g):+.4f} (min {min(g):+.4f}, n {len(g)})" for g in gain))
        lines.append(f"| learning gain of `{candidate}` | {steps[-1]} - {reference} | " + " | ".join(parts) + " |")
        if len(gains) == len(datasets):
            summary.append(f"- `{candidate}`: mean learning gain {statistics.mean(g[0] for g in gains):+.4f} image / "
                           f"{statistics.mean(g[1] for g in gains):+.4f} pixel AUROC; lowest dataset "
                           f"{min(g[0] for g in gains):+.4f} / {min(g[1] for g in gains):+.4f}")
    return "\n".join([*lines, "", *summary])


def gain_bound(rows_files: list[Path]) -> str:
    """Markdown: per dataset, the largest mean learning gain of any candidate in any of ``rows_files``, image and
    pixel apart. Chosen on test labels, so no label-free choice among these candidates can do better: if the mean
    of these maxima misses the bar, so does every rule that picks among them."""
    import statistics  # noqa: PLC0415

    best: dict[str, dict[int, tuple[float, str]]] = {}
    for rows_file in rows_files:
        runs = _read_runs([rows_file])  # each file's own last step: the screens ran to different step counts
        for (candidate, dataset), seeds in _seed_gains(runs, max(max(by_step) for by_step in runs.values())).items():
            for k in (0, 1):
                gain = statistics.mean(g[k] for g in seeds)
                if gain > best.setdefault(dataset, {}).get(k, (-math.inf, ""))[0]:
                    best[dataset][k] = (gain, f"`{candidate}` ({rows_file.stem}, n {len(seeds)})")
    lines = ["| dataset | largest image gain | by | largest pixel gain | by |", "|---|---|---|---|---|"]
    for dataset in sorted(best):
        (image, image_by), (pixel, pixel_by) = best[dataset][0], best[dataset][1]
        lines.append(f"| {dataset} | {image:+.4f} | {image_by} | {pixel:+.4f} | {pixel_by} |")
    means = [statistics.mean(best[d][k][0] for d in best) for k in (0, 1)]
    lines += ["", f"Mean over the datasets of the largest gains: {means[0]:+.4f} image / {means[1]:+.4f} pixel AUROC"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=parse_data, action="append", help="NAME=ROOT:CATEGORY")
    parser.add_argument("--time-steps", action="store_true",
                        help="only time a training step on 128 px and 256 px grids (Lite0's 40 and 112 channels)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", default="0,500,2000")
    parser.add_argument("--batch", type=int, default=8, help="training images per step")
    parser.add_argument("--radius", type=int, default=2, help="grid cells around the query that it may not see")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--query-share", type=float, default=1.0,
                        help="share of each level's positions predicted per training step (a fresh random subset)")
    parser.add_argument("--hide-outliers", action="store_true",
                        help="also score with each test image's most unusual tokens hidden from every query")
    parser.add_argument("--hide-share", type=float, default=0.05, help="share of an image's tokens hidden")
    parser.add_argument("--cross-fit", action="store_true",
                        help="two predictors on halves of the training rows; residual statistics out of fold "
                             "(by row: each exposure's pass is shuffled anew, so an image's exposures may straddle folds)")
    parser.add_argument("--gains", type=float, nargs="+", default=[0.9, 1.0, 1.1])
    parser.add_argument("--out", type=Path, help="folder of rows.jsonl (required unless --time-steps or --report)")
    parser.add_argument("--report", type=Path, nargs="+", help="only summarise these run folders (Markdown)")
    parser.add_argument("--bound", type=Path, nargs="+",
                        help="only the largest learning gain per dataset over every candidate of these rows files")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    if args.bound:
        print(gain_bound(args.bound))
        return 0
    if args.time_steps:
        torch.set_num_threads(1)
        for _ in range(2):  # twice: the machine is shared
            small = step_seconds([(16, 16), (8, 8)], (40, 112), args.radius, args.batch)
            large = step_seconds([(32, 32), (16, 16)], (40, 112), args.radius, args.batch)
            print(f"128 px grids {small * 1000:.0f} ms/step, 256 px grids {large * 1000:.0f} ms/step: {large / small:.1f}x")
            if args.query_share < 1:
                part = step_seconds([(32, 32), (16, 16)], (40, 112), args.radius, args.batch,
                                    query_share=args.query_share)
                print(f"256 px grids, {args.query_share:.0%} of the positions per step: {part * 1000:.0f} ms/step "
                      f"({large / part:.1f}x faster)")
        return 0
    if not args.data or args.out is None:
        parser.error("--data and --out are required")
    run_resumable(args, run_one)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
