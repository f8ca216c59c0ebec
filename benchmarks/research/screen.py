"""Screen FOD recipes and scores on real datasets: train once per seed, score every candidate at every step count.

The protocol behind FOD's default score screens settings cheaply (128 px) on every dataset and seed before a winner is
confirmed at 256 px in the benchmark harness. Training is FOD's own minimax (the model's loss, Adam)
on cached backbone features, as ``convergence_probe.py`` does; at each step count in ``--steps``
the current weights and their exponential moving averages (``--ema``) are scored with every
candidate scoring rule below, each computed from the same per-token observations:

- the reconstruction residual ``r = x - x_hat`` per channel, its MSE and ``1 - cos``;
- the inter-branch divergence (symmetric KL to the target, layer mean) per token, as the paper's
  within-image softmax score ``div`` or calibrated against the training images (``klz``, ``klr``);
- statistics of the *training* images only (never a test label): per-channel and per-position
  residual moments, a level-shared residual covariance, per-position divergence moments.

Levels are combined exactly as the model does (``AnomalyMapGenerator.combine_levels``: upsample,
average, blur, image score = map maximum). Exact image and pixel AUROC on raw scores; the pixel AUROC
of the un-blurred map too for the main candidates. Reporting only: nothing is selected on test labels.

    python benchmarks/research/screen.py --data battery_weld=anomalib_fod/data:battery_weld \\
        --image-size 128 128 --seeds 0 1 2 --batch 1 --steps 250,500,1000,2000 --ema 0.995 \\
        --out results/screen/b1

Rows go to ``<out>/rows.jsonl`` (one line per dataset, seed, step, weights, candidate); a run that is
stopped resumes with the (dataset, seed) pairs it has not finished. ``screen_report.py`` summarises.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

# Candidates whose un-blurred pixel AUROC is also reported (it costs one more pass over every pixel).
UNBLURRED = ("paper", "cos", "nmse_pc", "maha_r", "maha_pc", "maha_blend", "maha_z_klz")
SHRINK = 0.1  # share of the level's mean variance added to every per-position variance (few images)


@dataclass
class Observation:
    """Per level, what scoring rules are built from: ``(N, L, C)`` residuals, ``(N, L)`` terms."""

    tokens: list[torch.Tensor]
    residual: list[torch.Tensor]
    cosine: list[torch.Tensor]
    divergence: list[torch.Tensor]
    hidden: list[torch.Tensor] = field(default_factory=list)  # (N, L, D): last layer's output, before its norm


@torch.no_grad()
def observe(fod: Any, features: list[torch.Tensor], batch: int = 16, keep_hidden: bool = False) -> Observation:  # noqa: ANN401 - FodModel
    """Run the level Transformers on cached features and keep the per-token observations (``keep_hidden``: also
    each level's representation, ``(N, L, D)``: only for a candidate that reads it)."""
    from anomalib_fod.models.fod.anomaly_map import mean_divergence, reconstruction_parts  # noqa: PLC0415

    fod.eval()
    parts: dict[str, list[list[torch.Tensor]]] = {"tokens": [], "residual": [], "cosine": [], "divergence": []}
    # Each level's token representation after its last layer, which its final norm and head turn into the
    # reconstruction: the Transformer's own view of a token (with FOD's fusion, built from the two attentions'
    # outputs alone, and layer-normed per token by the layer itself).
    hooks = []
    if keep_hidden:
        parts["hidden"] = []
        hooks = [level.norm.register_forward_hook(lambda _, inputs, __: parts["hidden"][-1].append(inputs[0].float()))
                 for level in fod.levels]
    for start in range(0, features[0].shape[0], batch):
        for key in parts:
            parts[key].append([])
        run = fod.run_levels([f[start : start + batch] for f in features])
        for tokens, output in zip(run.tokens, run.levels, strict=True):
            if not output.inter:
                msg = "the screen reads the inter-branch divergence: build the model with scoring='rec_div'."
                raise ValueError(msg)
            _, cosine = reconstruction_parts(tokens, output.reconstruction)
            parts["tokens"][-1].append(tokens.float())
            parts["residual"][-1].append((tokens - output.reconstruction).float())
            parts["cosine"][-1].append(cosine)
            parts["divergence"][-1].append(mean_divergence(output.inter))
    for hook in hooks:
        hook.remove()
    levels = len(parts["tokens"][0])
    joined = {k: [torch.cat([chunk[i] for chunk in v]) for i in range(levels)] for k, v in parts.items()}
    return Observation(**joined)


@dataclass
class TrainStats:
    """Statistics of the training images' observations, per level."""

    channel_msq: torch.Tensor  # (C,)
    position_mean: torch.Tensor  # (L, C)
    position_var: torch.Tensor  # (L, C)
    residual_mean: torch.Tensor  # (L, C)
    residual_precision: torch.Tensor  # (C, C), level-shared
    feature_mean: torch.Tensor  # (L, C)
    feature_precision: torch.Tensor  # (C, C)
    position_precision: torch.Tensor  # (L, C, C), per-position covariance shrunk towards the shared one
    maha_mean: torch.Tensor  # (L,) of the training images' own maha_r
    maha_std: torch.Tensor  # (L,)
    divergence_mean: torch.Tensor  # (L,)
    divergence_std: torch.Tensor  # (L,)
    cosine_mean: torch.Tensor | None = None  # (L,) of the training images' 1 - cos
    cosine_std: torch.Tensor | None = None
    blend_mean: torch.Tensor | None = None  # (L,) of the training images' own maha_blend
    blend_std: torch.Tensor | None = None
    hidden_mean: torch.Tensor | None = None  # (L, D) of the Transformer's representation
    hidden_precision: torch.Tensor | None = None  # (D, D)
    hidden_position_precision: torch.Tensor | None = None  # (L, D, D)


def _precision(centred: torch.Tensor) -> torch.Tensor:
    """Inverse of the shrunk covariance of ``(M, C)`` centred samples."""
    channels = centred.shape[-1]
    cov = centred.T.double() @ centred.double() / max(1, centred.shape[0] - 1)
    cov += 0.01 * cov.trace() / channels * torch.eye(channels, dtype=cov.dtype)
    return torch.linalg.inv(cov).float()


def position_covariance(centred: torch.Tensor) -> torch.Tensor:
    """``(L, C, C)`` float64 covariances of ``(N, L, C)`` centred samples, one per token position."""
    centred = centred.double()
    return torch.einsum("nlc,nld->lcd", centred, centred) / max(1, centred.shape[0] - 1)


def shrink_towards(per_position: torch.Tensor, shared: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * per_position + weight * shared``: ``(L, C, C)`` covariances pulled to one ``(C, C)``."""
    return (1 - weight) * per_position + weight * shared.double()


def _position_precision(centred: torch.Tensor, shared: torch.Tensor, weight: float | None = None) -> torch.Tensor:
    """``(L, C, C)`` inverse covariances of ``(N, L, C)`` centred samples, each shrunk towards ``shared``.

    The weight of the shared covariance is ``weight``, by default ``C / (N + C)``: with as few images as
    channels, half of it.
    """
    count, _, channels = centred.shape
    weight = channels / (count + channels) if weight is None else weight
    return torch.linalg.inv(shrink_towards(position_covariance(centred), shared, weight)).float()


def _gaussian(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``(C, C)`` and per-position ``(L, C, C)`` precisions of ``(N, L, C)`` centred samples, each
    position's covariance shrunk towards the shared one."""
    precision = _precision(centred.flatten(0, 1))
    return precision, _position_precision(centred, torch.linalg.inv(precision.double()).float())


def _blend(centred: torch.Tensor, precision: torch.Tensor, position_precision: torch.Tensor) -> torch.Tensor:
    """The mean of the shared and the per-position distances (feature_distance.py's ``blend_position``)."""
    return 0.5 * (_mahalanobis(centred, precision) + _position_mahalanobis(centred, position_precision))


def train_stats(obs: Observation) -> list[TrainStats]:
    """Per-level statistics of the training images (no test image is involved); of the Transformer's
    representation too where the observation kept it."""
    stats = []
    for tokens, residual, divergence, cosine in zip(obs.tokens, obs.residual, obs.divergence, obs.cosine,
                                                     strict=True):
        var = residual.var(dim=0, unbiased=False)
        mean = residual.mean(dim=0)
        feature_mean = tokens.mean(dim=0)
        precision, position_precision = _gaussian(residual - mean)
        maha = _mahalanobis(residual - mean, precision)
        stats.append(
            TrainStats(
                channel_msq=residual.square().mean(dim=(0, 1)),
                position_mean=mean,
                position_var=var + SHRINK * var.mean(),
                residual_mean=mean,
                residual_precision=precision,
                feature_mean=feature_mean,
                feature_precision=_precision((tokens - feature_mean).flatten(0, 1)),
                position_precision=position_precision,
                maha_mean=maha.mean(dim=0),
                maha_std=maha.std(dim=0) + 1e-6,
                divergence_mean=divergence.mean(dim=0),
                divergence_std=divergence.std(dim=0) + 1e-6,
                cosine_mean=cosine.mean(dim=0),
                cosine_std=cosine.std(dim=0) + 1e-6,
            )
        )
        level = stats[-1]
        blend = _blend(residual - mean, precision, position_precision)
        level.blend_mean, level.blend_std = blend.mean(dim=0), blend.std(dim=0) + 1e-6
    for level, hidden in zip(stats, obs.hidden, strict=False):  # none kept: nothing to fit
        level.hidden_mean = hidden.mean(dim=0)
        level.hidden_precision, level.hidden_position_precision = _gaussian(hidden - level.hidden_mean)
    return stats


def _mahalanobis(centred: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    return ((centred @ precision) * centred).sum(-1).clamp_min(0).sqrt()


def _position_mahalanobis(centred: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(N, L, C)`` centred samples under ``(L, C, C)`` per-position precisions -> ``(N, L)`` distances."""
    return torch.einsum("nlc,lcd,nld->nl", centred, precision, centred).clamp_min(0).sqrt()


def candidates() -> dict[str, Callable[[Observation, list[TrainStats], int], torch.Tensor]]:
    """Scoring rules: ``(observation, train stats, level) -> (N, L)`` token scores."""

    def div(o: Observation, _: list[TrainStats], i: int) -> torch.Tensor:
        weights = torch.softmax(-o.divergence[i], dim=-1)
        return weights.amax(dim=-1, keepdim=True) - weights

    def mse(o: Observation, _: list[TrainStats], i: int) -> torch.Tensor:
        return o.residual[i].square().mean(-1)

    def cos(o: Observation, _: list[TrainStats], i: int) -> torch.Tensor:
        return o.cosine[i]

    def nmse_c(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return (o.residual[i].square() / s[i].channel_msq).mean(-1)

    def nmse_pc(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return ((o.residual[i] - s[i].position_mean).square() / s[i].position_var).mean(-1)

    def maha_r(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return _mahalanobis(o.residual[i] - s[i].residual_mean, s[i].residual_precision)

    def feat_maha(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return _mahalanobis(o.tokens[i] - s[i].feature_mean, s[i].feature_precision)

    def maha_pc(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return _position_mahalanobis(o.residual[i] - s[i].residual_mean, s[i].position_precision)

    def maha_z(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return (maha_r(o, s, i) - s[i].maha_mean) / s[i].maha_std

    def klz(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return (o.divergence[i] - s[i].divergence_mean) / s[i].divergence_std

    def klr(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return o.divergence[i] / s[i].divergence_mean.clamp_min(1e-6)

    def cos_z(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return (o.cosine[i] - s[i].cosine_mean) / s[i].cosine_std

    def maha_blend(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return _blend(o.residual[i] - s[i].residual_mean, s[i].residual_precision, s[i].position_precision)

    def blend_z(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return (maha_blend(o, s, i) - s[i].blend_mean) / s[i].blend_std

    def hidden_blend(o: Observation, s: list[TrainStats], i: int) -> torch.Tensor:
        return _blend(o.hidden[i] - s[i].hidden_mean, s[i].hidden_precision, s[i].hidden_position_precision)

    def times(a, b):  # noqa: ANN001, ANN202
        return lambda o, s, i: a(o, s, i) * b(o, s, i)

    def plus(a, b):  # noqa: ANN001, ANN202
        return lambda o, s, i: a(o, s, i) + b(o, s, i)

    return {
        "paper": times(plus(mse, cos), div),
        "cos_div": times(cos, div),
        "cos": cos,
        "mse": mse,
        "div": div,
        "nmse_c": nmse_c,
        "nmse_c_div": times(nmse_c, div),
        "nmse_pc": nmse_pc,
        "nmse_pc_div": times(nmse_pc, div),
        "maha_r": maha_r,
        "maha_r_div": times(maha_r, div),
        "klz": klz,
        "klr": klr,
        "nmse_pc_klr": times(nmse_pc, klr),
        "cos_klr": times(cos, klr),
        "maha_pc": maha_pc,
        "maha_blend": maha_blend,
        "maha_z": maha_z,
        "maha_z_klz": plus(maha_z, klz),
        "maha_z_klz_half": lambda o, s, i: maha_z(o, s, i) + 0.5 * klz(o, s, i),
        "feat_maha": feat_maha,  # diagnostic: PaDiM-like distance of the input features, no Transformer
        # the learned direction error and the whitened residual, each in the training images' per-position z-units
        "cos_z": cos_z,
        "blend_z": blend_z,
        "blend_cos_z": plus(blend_z, cos_z),
        "blend_cos_z_half": lambda o, s, i: blend_z(o, s, i) + 0.5 * cos_z(o, s, i),
        "blend_klz": plus(blend_z, klz),
        # the blended distance on what the Transformer makes of a token (its last layer, before the norm) instead of
        # on the reconstruction residual: does its representation hold more than the features' whitened distance?
        "hidden_blend": hidden_blend,
    }


def score_all(
    generator: Any,  # noqa: ANN401 - AnomalyMapGenerator
    test: Observation,
    stats: list[TrainStats],
    data: dict[str, Any],
    grids: list[tuple[int, int]],
    wanted: set[str] | None = None,
) -> Iterator[tuple[str, dict[str, float]]]:
    """Exact metrics of every candidate on the test observations."""
    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415

    labels = data["labels"].numpy()
    masks = data["masks"].numpy() if data["masks"] is not None else None
    blur = generator.blur
    for name, rule in candidates().items():
        if wanted and name not in wanted:
            continue
        token_scores = [rule(test, stats, i) for i in range(len(grids))]
        row: dict[str, float] = {}
        for blurred in (True, False) if name in UNBLURRED else (True,):
            generator.blur = blur if blurred else None
            maps, scores = generator.combine_levels(token_scores, grids, data["size"])
            suffix = "" if blurred else "_unblurred"
            if blurred:
                row["image_auroc"] = image_auroc(scores.numpy(), labels)
            row["pixel_auroc" + suffix] = pixel_auroc(maps[:, 0].numpy(), masks) if masks is not None else math.nan
        generator.blur = blur
        yield name, row


def token_whitening(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(C,)`` and symmetric whitening ``(C, C)`` of every token of ``(N, C, h, w)`` features (shrunk 1 %)."""
    tokens = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
    mean = tokens.mean(dim=0)
    cov = (tokens - mean).T @ (tokens - mean) / max(1, tokens.shape[0] - 1)
    cov += 0.01 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(cov)
    return mean.float(), (vectors * values.rsqrt()) @ vectors.T


def apply_whitening(features: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` features in whitened coordinates."""
    tokens = features.permute(0, 2, 3, 1) - mean
    return (tokens @ whitening.float()).permute(0, 3, 1, 2).contiguous()


def scaled(loader: Any, gain: float) -> Iterator[Any]:  # noqa: ANN401 - an anomalib loader and its batches
    """``loader``'s batches with their images (intensities in ``[0, 1]``) times ``gain``, clipped, as Fod's
    ``intensity_gains`` sees them before the pre-processing."""
    for batch in loader:
        batch.image = (batch.image * gain).clamp(0, 1)
        yield batch


def parse_data(text: str) -> tuple[str, Path, str]:
    """``name=root:category``."""
    name, _, rest = text.partition("=")
    root, _, category = rest.rpartition(":")
    if not (name and root and category):
        msg = f"--data expects NAME=ROOT:CATEGORY, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return name, Path(root), category


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=parse_data, action="append", required=True, help="NAME=ROOT:CATEGORY, repeatable")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", required=True, help="comma-separated optimizer step counts")
    parser.add_argument("--ema", type=float, nargs="*", default=[], help="EMA decays of the weights to score too")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the model's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model setting (YAML value)")
    parser.add_argument("--max-train-stats", type=int, default=200, help="training images for the statistics")
    parser.add_argument("--whiten", action="store_true",
                        help="whiten every level's features with the training tokens' covariance before training")
    parser.add_argument("--gains", type=float, nargs="+", default=[1.0],
                        help="fit the statistics on the training images at each of these intensity gains (as "
                             "Fod's intensity_gains); training sees the images as they are")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-checkpoints", action="store_true", help="keep the weights of every step count (fp16)")
    parser.add_argument("--candidates", nargs="*", default=None, help="score only these candidates")
    return parser


def done_pairs(rows: Path) -> set[tuple[str, int]]:
    """(dataset, seed) pairs whose last step is already in ``rows``."""
    if not rows.exists():
        return set()
    finished = set()
    for line in rows.read_text().splitlines():
        row = json.loads(line)
        if row.get("final"):
            finished.add((row["dataset"], row["seed"]))
    return finished


def mvtec_datamodule(root: Path, category: str) -> Any:  # noqa: ANN401 - an anomalib datamodule
    """The probes' datamodule, set up: an MVTec-layout category in batches of 16, no workers, validation = test."""
    from anomalib.data import MVTecAD  # noqa: PLC0415

    datamodule = MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=16, num_workers=0,
                         val_split_mode="same_as_test")
    datamodule.setup()
    return datamodule


def build_model(image_size: tuple[int, int], settings: dict[str, Any]) -> Any:  # noqa: ANN401 - Fod
    """The screened model. Its own scoring is the paper's unless ``settings`` say otherwise: every
    candidate reads the inter-branch divergence, which ``Fod()``'s default score does not compute."""
    from anomalib_fod import Fod  # noqa: PLC0415

    return Fod(image_size=image_size, visualizer=False, **{"scoring": "rec_div", **settings})


def run_one(args: argparse.Namespace, name: str, root: Path, category: str, seed: int, rows_file: Path) -> None:
    """Train one seed on one dataset and write its rows."""
    sys.path.insert(0, str(Path(__file__).parent))
    from convergence_probe import cache_features, index_stream, parse_settings  # noqa: PLC0415

    steps = sorted({int(v) for v in args.steps.split(",") if v.strip()})
    torch.manual_seed(seed)
    model = build_model(tuple(args.image_size), parse_settings(args.set))
    datamodule = mvtec_datamodule(root, category)
    train = cache_features(model, datamodule.train_dataloader(), f"{name}: training images")
    gained = [train["features"] if gain == 1 else
              cache_features(model, scaled(datamodule.train_dataloader(), gain), f"{name}: training images x{gain}")[
                  "features"]
              for gain in args.gains]
    test = cache_features(model, datamodule.test_dataloader(), f"{name}: test images")
    if args.whiten:  # every feature map, training and test, in the training tokens' whitened coordinates
        whitenings = [token_whitening(f) for f in train["features"]]
        unique = {id(features): features for features in (train["features"], test["features"], *gained)}
        for features in unique.values():  # the gain-1 list is the training list itself: whiten it once
            features[:] = [apply_whitening(f, *w) for f, w in zip(features, whitenings, strict=True)]
    fod = model.model
    fod.set_mean_reference([f.mean(dim=0) for f in train["features"]])
    params = [p for p in fod.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr or model.learning_rate)
    averages = {decay: [p.detach().clone() for p in params] for decay in args.ema}
    count = train["labels"].shape[0]
    stream = index_stream(count, args.batch, torch.Generator().manual_seed(seed))
    stats_index = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[: args.max_train_stats]
    train_subset = [torch.cat([features[level][stats_index] for features in gained])
                    for level in range(len(train["features"]))]
    grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in train["features"]]
    step, seconds = 0, 0.0
    progress = tqdm(total=steps[-1], desc=f"{name} seed {seed}", unit="step")
    for target in steps:
        start = time.perf_counter()
        fod.train()
        while step < target:
            output = fod.forward_features([f[next(stream)] for f in train["features"]])
            loss, _ = model.loss(output.tokens, output.levels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for decay, average in averages.items():
                    torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - decay)
            step += 1
            progress.update()
        seconds += time.perf_counter() - start
        weight_sets = {"raw": None, **{f"ema{decay}": average for decay, average in averages.items()}}
        for label, average in weight_sets.items():
            scored = fod if average is None else copy.deepcopy(fod)
            if average is not None:
                with torch.no_grad():
                    for p, a in zip([p for p in scored.parameters() if p.requires_grad], average, strict=True):
                        p.copy_(a)
            wanted = set(args.candidates) if args.candidates else None
            hidden = wanted is None or "hidden_blend" in wanted
            stats = train_stats(observe(scored, train_subset, keep_hidden=hidden))
            test_obs = observe(scored, test["features"], keep_hidden=hidden)
            for candidate, metrics in score_all(scored.anomaly_map_generator, test_obs, stats, test, grids, wanted):
                row = {"dataset": name, "seed": seed, "batch": args.batch, "step": step, "images_seen": step * args.batch,
                       "weights": label, "candidate": candidate, "train_seconds": round(seconds, 1),
                       "settings": args.set, "image_size": list(args.image_size), "gains": args.gains,
                       "whiten": args.whiten, **metrics}
                with rows_file.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
        if args.save_checkpoints:
            torch.save({k: v.half() for k, v in fod.state_dict().items()}, args.out / f"{name}_seed{seed}_step{step}.pt")
        progress.write(f"{name} seed {seed} step {step}: scored ({seconds:.0f} s of training so far)")
    progress.close()
    with rows_file.open("a") as handle:
        handle.write(json.dumps({"dataset": name, "seed": seed, "final": True, "train_seconds": seconds}) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run every (dataset, seed) pair not finished yet."""
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "rows.jsonl"
    (args.out / "args.yaml").write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items() if k != "data"} |
                                                        {"data": [f"{n}={r}:{c}" for n, r, c in args.data]}))
    finished = done_pairs(rows_file)
    for seed in args.seeds:
        for name, root, category in args.data:
            if (name, seed) in finished:
                continue
            # A pair stopped half-way left rows without its "final" marker: drop them, then redo it.
            if rows_file.exists():
                kept = [line for line in rows_file.read_text().splitlines()
                        if not (json.loads(line)["dataset"] == name and json.loads(line)["seed"] == seed)]
                rows_file.write_text("".join(line + "\n" for line in kept))
            run_one(args, name, root, category, seed, rows_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
