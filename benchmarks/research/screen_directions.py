"""Screen: the context predictor from four half-planes, the token's score the smallest of the four residuals.

Research probe (cached features, no Lightning), a sibling of ``screen_context.py`` (same features, whitening,
distances, rows and ``--report``). The context predictor's map loses pixel AUROC on bottle and the texture because a
defect spoils its neighbours' predictions: their residuals rise too and the defect's score smears into a ring.
Hiding each image's most unusual tokens from the queries helps only where every defect token is among them.

Here the smear is removed by construction. One predictor (shared weights, a learned code per direction in the
query) predicts each token four times, each time from one half-plane only (keys left of, right of, above or below
the query, beyond the ``--radius`` neighbourhood as before). Each direction's residual gets its own Gaussian and
per-position z-units from the training images; the token's context score is the smallest of its four z-scores. A
defect token is unexplained from every side, so all four residuals are high; a normal token next to a defect has
at least one half-plane that does not hold the defect, so its smallest residual stays normal.

Rows per step (step 0: the untrained predictor, the learning gain's reference):
- ``feat_blend`` / ``feat_fodimage``: the input tokens' whitened distance (nothing learned), as in ``screen_context``;
- ``dir_min_z``: the smallest of the four directions' context z-scores alone;
- ``dir_sum_z``: the feature z-score plus ``dir_min_z`` (the context option's sum with the directional context);
- ``dir_sum_z_fodimage``: the map of ``dir_sum_z`` with ``Fod()``'s image rule (both distances under each
  position's own covariance, in their per-position z-units, the smaller of the four for the context);
- ``dir_sum_z_hidden`` / ``dir_sum_z_hidden_fodimage``: the same with each test image's ``--hide-share`` most
  unusual tokens also hidden from every query (the context option's rule), to see whether hiding still adds.
Nothing is chosen on test labels.

    python benchmarks/research/screen_directions.py --data bottle=<datasets>/mvtec_ad:bottle --image-size 128 128 \\
        --seeds 0 1 2 --steps 0,1000 --query-share 0.25 --out results/research/directions_128
    python benchmarks/research/screen_context.py --report results/research/directions_128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from screen import parse_data  # noqa: E402
from screen_context import Distance, prepare, run_resumable, sincos_positions  # noqa: E402

from anomalib_fod.models.fod.context import MASKED, CrossAttention  # noqa: E402

DIRECTIONS = 4  # keys left of, right of, above, below the query


def direction_masks(height: int, width: int, radius: int) -> torch.Tensor:
    """``(4, L, L)`` bool, True where key ``j`` may not be read by query ``i`` looking in that direction: within
    ``radius`` cells (Chebyshev) of the query, or outside the direction's open half-plane."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy, dx = ys[None] - ys[:, None], xs[None] - xs[:, None]  # key minus query
    near = (dy.abs() <= radius) & (dx.abs() <= radius)
    sides = torch.stack([dx < 0, dx > 0, dy < 0, dy > 0])
    return near[None] | ~sides


class DirectionalPredictor(nn.Module):
    """``(B, L, C)`` whitened tokens -> ``(B, Q, C)`` each asked position predicted from one half-plane."""

    def __init__(self, channels: int, grid: tuple[int, int], radius: int, dim: int = 128, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.register_buffer("positions", sincos_positions(*grid, dim))
        self.register_buffer("masks", direction_masks(*grid, radius))
        self.embed = nn.Linear(channels, dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.direction = nn.Parameter(torch.zeros(DIRECTIONS, dim))
        self.attention = nn.ModuleList(CrossAttention(dim, heads) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                 for _ in range(layers))
        self.out = nn.Linear(dim, channels)

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor, directions: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``queries`` / ``directions``: ``(Q,)`` positions to predict and the half-plane each reads from;
        ``hidden``: ``(B, L)`` bool, tokens no query may read."""
        bias = self.masks[directions, queries].to(tokens.dtype)[None, None] * MASKED
        if hidden is not None:
            bias = bias + hidden.to(tokens.dtype)[:, None, None, :] * MASKED
        memory = self.embed(tokens) + self.positions
        query = (self.query + self.positions[queries] + self.direction[directions]).expand(tokens.shape[0], -1, -1)
        for index, (attention, ffn) in enumerate(zip(self.attention, self.ffn, strict=True)):
            query = query + attention(self.norms[2 * index](query), memory, bias)
            query = query + ffn(self.norms[2 * index + 1](query))
        return self.out(query)


@torch.no_grad()
def residuals(predictor: DirectionalPredictor, tokens: torch.Tensor, hidden: torch.Tensor | None = None,
              batch: int = 32) -> list[torch.Tensor]:
    """Per direction, ``(N, L, C)`` tokens minus their prediction from that half-plane."""
    length = tokens.shape[1]
    everywhere = torch.arange(length)
    out = []
    for direction in range(DIRECTIONS):
        looking = torch.full((length,), direction, dtype=torch.long)
        predicted = torch.cat([
            predictor(tokens[s : s + batch], everywhere, looking, None if hidden is None else hidden[s : s + batch])
            for s in range(0, tokens.shape[0], batch)
        ])
        out.append(tokens - predicted)
    return out


def run_one(args: argparse.Namespace, name: str, root: Path, category: str, seed: int, rows: Path) -> None:
    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415

    data = prepare(args, name, root, category, seed)
    generator, train_tokens, test_tokens, grids = data.generator, data.train_tokens, data.test_tokens, data.grids
    feature_distance, test, labels, masks = data.feature_distance, data.test, data.labels, data.masks
    weights = generator.map_level_weights
    feat_z = [d.z(t) for d, t in zip(feature_distance, test_tokens, strict=True)]
    feat_zp = [d.zp(t) for d, t in zip(feature_distance, test_tokens, strict=True)]

    def metrics(token_scores: list[torch.Tensor], image_tokens: list[torch.Tensor] | None = None) -> dict:
        maps, scores = generator.combine_levels(token_scores, grids, test["size"], weights)
        if image_tokens is not None:
            scores = generator.combine_levels(image_tokens, grids, test["size"])[1]
        return {"image_auroc": image_auroc(scores.numpy(), labels),
                "pixel_auroc": pixel_auroc(maps[:, 0].numpy(), masks) if masks is not None else math.nan}

    def write(step: int, candidate: str, row: dict, seconds: float) -> None:
        with rows.open("a") as handle:
            handle.write(json.dumps({"dataset": name, "seed": seed, "step": step, "candidate": candidate,
                                     "radius": args.radius, "directions": DIRECTIONS,
                                     "query_share": args.query_share, "image_size": list(args.image_size),
                                     "train_seconds": round(seconds, 1), **row}) + "\n")

    predictors = [DirectionalPredictor(t.shape[-1], g, args.radius) for t, g in zip(train_tokens, grids, strict=True)]
    optimizer = torch.optim.Adam([p for m in predictors for p in m.parameters()], lr=args.lr)
    index_gen = torch.Generator().manual_seed(seed)
    step, seconds = 0, 0.0
    for target in sorted({int(v) for v in args.steps.split(",")}):
        start = time.perf_counter()
        for m in predictors:
            m.train()
        while step < target:
            loss = 0.0
            index = torch.randint(train_tokens[0].shape[0], (args.batch,), generator=index_gen)
            for m, t in zip(predictors, train_tokens, strict=True):
                length = t.shape[1]
                queries = torch.randperm(length, generator=index_gen)[: math.ceil(args.query_share * length)]
                looking = torch.randint(DIRECTIONS, (len(queries),), generator=index_gen)
                loss = loss + (m(t[index], queries, looking) - t[index][:, queries]).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        seconds += time.perf_counter() - start
        for m in predictors:
            m.eval()
        # Per level and direction: the training residuals' Gaussian and z-units, then the test residuals' z-scores.
        train_res = [residuals(m, t) for m, t in zip(predictors, train_tokens, strict=True)]
        fitted = [[Distance(r) for r in by_direction] for by_direction in train_res]
        explained = [1 - float(min(r.square().mean() for r in by_direction) / t.square().mean())
                     for by_direction, t in zip(train_res, train_tokens, strict=True)]
        outputs: list[tuple[str, list[torch.Tensor], list[torch.Tensor] | None]] = [
            ("feat_blend", [d(t) for d, t in zip(feature_distance, test_tokens, strict=True)], None),
            ("feat_fodimage", [d(t) for d, t in zip(feature_distance, test_tokens, strict=True)],
             [d.at_position(t) for d, t in zip(feature_distance, test_tokens, strict=True)]),
        ]
        variants = [("", None)]
        if args.hide_outliers:
            variants.append(("_hidden", [z >= z.quantile(1 - args.hide_share, dim=1, keepdim=True) for z in feat_z]))
        for suffix, hidden in variants:
            test_res = [residuals(m, t, None if hidden is None else hidden[level])
                        for level, (m, t) in enumerate(zip(predictors, test_tokens, strict=True))]
            min_z = [torch.stack([d.z(r) for d, r in zip(ds, rs, strict=True)]).amin(dim=0)
                     for ds, rs in zip(fitted, test_res, strict=True)]
            min_zp = [torch.stack([d.zp(r) for d, r in zip(ds, rs, strict=True)]).amin(dim=0)
                      for ds, rs in zip(fitted, test_res, strict=True)]
            sum_z = [f + c for f, c in zip(feat_z, min_z, strict=True)]
            sum_zp = [f + c for f, c in zip(feat_zp, min_zp, strict=True)]
            outputs += [(f"dir_min_z{suffix}", min_z, None), (f"dir_sum_z{suffix}", sum_z, None),
                        (f"dir_sum_z{suffix}_fodimage", sum_z, sum_zp)]
        for candidate, token_scores, image_tokens in outputs:
            write(step, candidate, {**metrics(token_scores, image_tokens),
                                    "explained": [round(e, 4) for e in explained]}, seconds)
        print(f"{name} seed {seed} step {step} ({seconds:.0f} s), explained (best direction) {explained}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=parse_data, action="append", required=True, help="NAME=ROOT:CATEGORY")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", default="0,1000")
    parser.add_argument("--batch", type=int, default=8, help="training images per step")
    parser.add_argument("--radius", type=int, default=2, help="grid cells around the query that it may not see")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--query-share", type=float, default=0.25,
                        help="share of each level's positions predicted per step, each from a random direction")
    parser.add_argument("--hide-outliers", action="store_true", help="also score with the hiding rule on top")
    parser.add_argument("--hide-share", type=float, default=0.05)
    parser.add_argument("--gains", type=float, nargs="+", default=[0.9, 1.0, 1.1])
    parser.add_argument("--out", type=Path, required=True, help="folder of rows.jsonl")
    args = parser.parse_args(argv)
    run_resumable(args, run_one)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
