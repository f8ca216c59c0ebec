"""Screen: a token discriminator trained on synthetic feature-level defects, against the whitened distance.

Research probe (cached features, no Lightning): per level, the training tokens are whitened with their shared
covariance (as the default score whitens them); a small MLP learns to tell each whitened token from the same
token plus Gaussian noise (a defect just off the normal manifold), optionally with the image's mean token as
context. Its logit is a learned anomaly score; the whitened distance of the same tokens (a Gaussian, nothing
learned) is the baseline. Step 0 is the untrained discriminator. Nothing is chosen on test labels.

    python benchmarks/research/screen_discriminator.py --data bottle=<datasets>/mvtec_ad:bottle --image-size 128 128 \\
        --seeds 0 --steps 0,250,1000 --noise 1.0 --out results/screen/disc_128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from screen import (  # noqa: E402
    Observation,
    mvtec_datamodule,
    parse_data,
    scaled,
    score_all,
    train_stats,
    token_whitening,
)


class Discriminator(nn.Module):
    """``(B, L, C)`` whitened tokens (and optionally their image's mean token) -> ``(B, L)`` anomaly logits."""

    def __init__(self, channels: int, context: bool, hidden: int = 256) -> None:
        super().__init__()
        self.context = context
        self.net = nn.Sequential(
            nn.Linear(channels * (2 if context else 1), hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, tokens: torch.Tensor, image_mean: torch.Tensor | None = None) -> torch.Tensor:
        if self.context:
            mean = tokens.mean(dim=1, keepdim=True) if image_mean is None else image_mean
            tokens = torch.cat([tokens, mean.expand_as(tokens)], dim=-1)
        return self.net(tokens).squeeze(-1)


def whitened_tokens(features: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, L, C)`` whitened tokens."""
    return (features.flatten(2).transpose(1, 2) - mean) @ whitening.float()


@torch.no_grad()
def synthetic_defects(
    model, datamodule, source: str, copies: int, whitenings, seed: int  # noqa: ANN001
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Whitened tokens ``(N * copies, L, C)`` of the training images with synthetic defects, and each token's share
    ``(N * copies, L)`` of defect pixels, per level (CDO's generators: ``white_noise`` rectangles or ``perlin``)."""
    import torch.nn.functional as F  # noqa: N812, PLC0415

    from anomalib_fod.benchmark.curve import preprocess_as_test  # noqa: PLC0415
    from anomalib_fod.models.cdo.synthetic import make_anomaly_generator  # noqa: PLC0415

    torch.manual_seed(seed)
    generator = make_anomaly_generator(source)
    tokens, labels = [], []
    for _ in range(copies):
        for batch in datamodule.train_dataloader():
            images = preprocess_as_test(model, batch).image
            corrupted, masks = generator(images)
            features = model.model.extract_features(corrupted)
            tokens.append([whitened_tokens(f, *w) for f, w in zip(features, whitenings, strict=True)])
            labels.append([F.adaptive_avg_pool2d(masks.float(), f.shape[-2:]).flatten(1) for f in features])
    levels = range(len(tokens[0]))
    return [torch.cat([t[i] for t in tokens]) for i in levels], [torch.cat([m[i] for m in labels]) for i in levels]


def run_one(args: argparse.Namespace, name: str, root: Path, category: str, seed: int, rows: Path) -> None:
    from convergence_probe import cache_features  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415

    torch.manual_seed(seed)
    model = Fod(image_size=tuple(args.image_size), visualizer=False)
    datamodule = mvtec_datamodule(root, category)
    train = cache_features(model, datamodule.train_dataloader(), f"{name}: training images")
    gained = [train["features"] if gain == 1 else
              cache_features(model, scaled(datamodule.train_dataloader(), gain), f"{name}: x{gain}")["features"]
              for gain in args.gains]
    test = cache_features(model, datamodule.test_dataloader(), f"{name}: test images")
    levels = len(train["features"])
    stats_features = [torch.cat([g[level] for g in gained]) for level in range(levels)]
    whitenings = [token_whitening(f) for f in stats_features]
    grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in train["features"]]

    def observation(features: list[torch.Tensor]) -> Observation:
        tokens = [whitened_tokens(f, *w) for f, w in zip(features, whitenings, strict=True)]
        zeros = [t[..., 0] * 0 for t in tokens]
        return Observation(tokens=tokens, residual=tokens, cosine=zeros, divergence=zeros)

    defect_tokens, defect_labels = None, None
    if args.defects != "gaussian":
        defect_tokens, defect_labels = synthetic_defects(model, datamodule, args.defects, args.copies, whitenings, seed)
    stats = train_stats(observation(stats_features))
    test_obs = observation(test["features"])
    train_tokens = [whitened_tokens(f, *w) for f, w in zip(stats_features, whitenings, strict=True)]
    generator = model.model.anomaly_map_generator

    def write(step: int, label: str, metrics: dict[str, float], seconds: float) -> None:
        row = {"dataset": name, "seed": seed, "step": step, "weights": "raw", "candidate": label,
               "noise": args.noise, "context": args.context, "defects": args.defects, "image_size": list(args.image_size),
               "train_seconds": round(seconds, 1), **metrics}
        with rows.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    for candidate, metrics in score_all(generator, test_obs, stats, test, grids, {"maha_r", "maha_pc", "maha_blend", "blend_z"}):
        write(0, candidate, metrics, 0.0)
    discriminators = [Discriminator(t.shape[-1], args.context) for t in train_tokens]
    params = [p for d in discriminators for p in d.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    noise_gen = torch.Generator().manual_seed(seed)
    count = train_tokens[0].shape[0]
    step, seconds = 0, 0.0
    for target in sorted({int(v) for v in args.steps.split(",")}):
        start = time.perf_counter()
        while step < target:
            index = torch.randint(count, (args.batch,), generator=noise_gen)
            loss = 0.0
            defect_index = None if defect_tokens is None else torch.randint(
                defect_tokens[0].shape[0], (args.batch,), generator=noise_gen)
            for level, (disc, tokens) in enumerate(zip(discriminators, train_tokens, strict=True)):
                clean = tokens[index]
                image_mean = clean.mean(dim=1, keepdim=True)
                if defect_index is None:
                    noisy = clean + args.noise * torch.randn(clean.shape, generator=noise_gen)
                    noisy_labels = torch.ones(noisy.shape[:2])
                    noisy_mean = image_mean
                else:
                    noisy = defect_tokens[level][defect_index]
                    noisy_labels = defect_labels[level][defect_index]
                    noisy_mean = noisy.mean(dim=1, keepdim=True)
                logits = torch.cat([disc(clean, image_mean), disc(noisy, noisy_mean)])
                labels = torch.cat([torch.zeros(clean.shape[:2]), noisy_labels])
                loss = loss + loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        seconds += time.perf_counter() - start
        with torch.no_grad():
            logits = [d(t) for d, t in zip(discriminators, test_obs.tokens, strict=True)]
            train_logits = [d(t) for d, t in zip(discriminators, train_tokens, strict=True)]
        learned = Observation(tokens=test_obs.tokens, residual=test_obs.residual, cosine=logits,
                              divergence=test_obs.divergence)
        for level, t in enumerate(train_logits):  # the logit in the training images' per-position z-units
            stats[level].cosine_mean, stats[level].cosine_std = t.mean(dim=0), t.std(dim=0) + 1e-6
        for candidate, metrics in score_all(generator, learned, stats, test, grids,
                                            {"cos", "cos_z", "blend_cos_z", "blend_cos_z_half"}):
            write(step, {"cos": "disc", "cos_z": "disc_z", "blend_cos_z": "blend_disc_z",
                         "blend_cos_z_half": "blend_disc_z_half"}[candidate], metrics, seconds)
        print(f"{name} seed {seed} step {step} ({seconds:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=parse_data, action="append", required=True, help="NAME=ROOT:CATEGORY")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", default="250,1000")
    parser.add_argument("--batch", type=int, default=4, help="training images per step")
    parser.add_argument("--noise", type=float, default=1.0, help="std of the Gaussian defect in whitened units")
    parser.add_argument("--defects", choices=["gaussian", "white_noise", "perlin"], default="gaussian",
                        help="negatives: Gaussian noise on the tokens, or CDO's image-level synthetic defects")
    parser.add_argument("--copies", type=int, default=2, help="defective copies of every training image")
    parser.add_argument("--context", action="store_true", help="the discriminator also reads the image's mean token")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gains", type=float, nargs="+", default=[0.9, 1.0, 1.1])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name, root, category in args.data:
            run_one(args, name, root, category, seed, args.out / "rows.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
