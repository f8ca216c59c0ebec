"""The nearest normal token: each token's distance to the closest of a bank of training tokens, beside the Gaussian.

FOD's default judges a token by a Gaussian of the training images' residuals at its position: one ellipsoid per
position holds every look a product has there. Where normal images come in several looks (pooled paper types,
woven textures) a defect can sit between two looks and inside the ellipsoid; where a part is not tied to a
position the ellipsoid is wide. The distance to the nearest training token (PatchCore's score) keeps the looks
apart and knows nothing of position, so it errs where the Gaussian does not, and the other way round. With
``nearest_tokens`` both are added, per level:

- the bank: ``nearest_tokens`` input tokens drawn at random from every training image at every intensity gain,
  in the tokens' own whitening (so no channel dominates by its scale);
- the z-units: mean and standard deviation of each distance over held-out training tokens. The training images
  are split in two folds; each fold's images (as they are) are scored by a Gaussian and a bank fitted on the
  other fold (at every gain), so a normal image is measured as a test image will be, not in-sample;
- the anomaly map's token score: the Gaussian's distance (``residual_covariance``) plus the nearest-token
  distance, each in its z-units; the image score's (``image_score="position"``): the per-position distance plus
  the nearest-token distance, each in its z-units.

Whether to add it at all is decided on the training images, without labels (``nearest_position_limit``): the
share of a normal token's variation that its grid position explains (:func:`position_share`, on the finest
level). An aligned part's tokens are mostly told by where they are (a share around 2/3 on the shared aligned
datasets), and there the Gaussian per position is the better model: the nearest token, blind to position, only
adds noise. A texture's, a turning part's or a few-image product's are not (0.05-0.2), and there the nearest
token sees what one ellipsoid per position merges. A declined score keeps only the shares (the model scores as
without the option).

Everything needed at inference is a buffer of :class:`NearestLevel`, so checkpoints and exported graphs carry
it; the distance is matrix products and a minimum over bank slices, which every exporter handles. The fit is
:func:`fit_nearest`, fed by ``fitting.fit_residual_statistics``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .context import fit_whitening
from .residual_statistics import (
    ResidualAccumulator,
    ResidualStatistics,
    adopt_stored_shapes,
    chunks,
    forgive_missing,
    run_generator,
)
from .settings import ResidualCovariance

logger = logging.getLogger(__name__)

# Bank rows per slice of the distance: bounds the (B, L, slice) block of squared distances (32 MiB per 256x256
# image on the stride-8 level); the exported graph holds one product per slice.
BANK_SLICE = 8192
# Positions of the z-units (mean, then standard deviation) in ``NearestLevel.units``.
MAP, NEAREST = 0, 2


def nearest_distance(tokens: torch.Tensor, bank: torch.Tensor, bank_squares: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every token ``(B, L, C)`` to its nearest bank row ``(K, C)`` (whose squared norms are
    ``bank_squares`` ``(K,)``), ``(B, L)``. The row is found with matrix products, ``|b|^2 - 2 t.b`` minimised slice
    by slice; its distance is then measured as ``|t - b|``. For a close row the products' terms nearly cancel, which
    reduced precision (bf16, 8 significant bits) turns into noise of the order of ``|t|^2 / 256``; the difference
    keeps its own relative precision."""
    tokens = tokens.float()
    best: torch.Tensor | None = None
    index: torch.Tensor | None = None
    for start in range(0, bank.shape[0], BANK_SLICE):
        rows = slice(start, start + BANK_SLICE)
        value, where = (bank_squares[rows] - 2 * tokens @ bank[rows].T).min(dim=-1)
        if best is None:
            best, index = value, where
        else:
            closer = value < best
            best, index = torch.where(closer, value, best), torch.where(closer, where + start, index)
    if index is None:
        msg = "the nearest-token bank is empty."
        raise RuntimeError(msg)
    return (tokens - bank[index]).square().sum(-1).sqrt()


class NearestLevel(nn.Module):
    """One level's nearest-token score and the z-units that put it beside the Gaussian.

    Buffers (empty until fitted): ``token_mean`` ``(C,)`` and ``whitening`` ``(C, C)`` of the input tokens;
    ``bank`` ``(K, C)``, whitened training tokens, and ``bank_squares`` ``(K,)`` their squared norms; ``units``
    ``(4,)``: mean and standard deviation over held-out training tokens of the anomaly map's Gaussian distance
    and of the nearest-token distance; ``position_units`` ``(2,)`` the same of the per-position distance (the
    image score's; empty when the statistics hold no per-position covariances); ``position_share`` ``(1,)`` the
    share of the level's token variation its grid position explains (:func:`position_share`). A level whose
    score was declined (:func:`fit_nearest`) holds its share and nothing else.
    """

    BUFFERS = ("token_mean", "whitening", "bank", "bank_squares", "units", "position_units", "position_share")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("token_mean", torch.empty(0))
        self.register_buffer("whitening", torch.empty(0, 0))
        self.register_buffer("bank", torch.empty(0, 0))
        self.register_buffer("bank_squares", torch.empty(0))
        self.register_buffer("units", torch.empty(0))
        self.register_buffer("position_units", torch.empty(0))
        self.register_buffer("position_share", torch.empty(0))

    @property
    def fitted(self) -> bool:
        """Whether the bank and the z-units have been fitted (or loaded)."""
        return self.bank.numel() > 0 and self.units.numel() > 0

    @property
    def declined(self) -> bool:
        """Whether the fit measured the position share and left the score out (:func:`fit_nearest`)."""
        return self.position_share.numel() > 0 and not self.fitted

    @property
    def unmeasured(self) -> bool:
        """Whether the score was left out before its share could be measured (a DDP fit or a
        single training image): a refit does not reconsider it."""
        return self.declined and bool(torch.isnan(self.position_share).all())

    def decline(self, share: float | None = None) -> None:
        """Leave the score out: drop the bank and the z-units, keep the position ``share`` (None: the one
        measured; NaN: not measured)."""
        for name in self.BUFFERS:
            if name != "position_share":
                setattr(self, name, getattr(self, name).new_empty((0,) * getattr(self, name).dim()))
        if share is not None:
            self.position_share = torch.tensor([share], device=self.position_share.device)

    @property
    def has_position_units(self) -> bool:
        """Whether the image score's z-units (of the per-position distance) were fitted."""
        return self.position_units.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:  # noqa: ANN001
        """The buffers take the stored shapes (they are empty until a fit). A checkpoint from before the position
        share loads with its score as it was; one from before the score loads with the score left out."""
        adopt_stored_shapes(self, state_dict, prefix, self.BUFFERS)
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        forgiven = forgive_missing(prefix, self.BUFFERS, missing_keys, before)
        if len(forgiven) == len(self.BUFFERS):
            self.decline(float("nan"))

    def set_bank(self, mean: torch.Tensor, whitening: torch.Tensor, tokens: torch.Tensor) -> None:
        """Store the ``(C,)`` mean and ``(C, C)`` whitening, and the bank of ``(K, C)`` raw tokens (whitened here)."""
        self.token_mean = mean.detach().float()
        self.whitening = whitening.detach().float()
        self.bank = self.whiten(tokens)
        self.bank_squares = self.bank.square().sum(-1)

    def set_units(self, units: torch.Tensor, position_units: torch.Tensor | None = None) -> None:
        """Store the ``(4,)`` z-units and the ``(2,)`` ones of the per-position distance (see the class)."""
        self.units = units.detach().float().to(self.bank.device)
        self.position_units = (
            self.units.new_empty(0) if position_units is None else position_units.detach().float().to(self.bank.device)
        )

    def whiten(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(..., C)`` in whitened coordinates."""
        return (tokens.float() - self.token_mean) @ self.whitening

    def distance(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` distance of the input tokens ``(B, L, C)`` to their nearest bank token, whitened."""
        if not self.fitted:
            msg = (
                "FOD's nearest-token score is not fitted: its bank and z-units are fitted on the training images "
                "after training. Train the model, or fit them on a trained checkpoint with "
                "Fod.fit_residual_statistics(datamodule)."
            )
            raise RuntimeError(msg)
        return nearest_distance(self.whiten(tokens), self.bank, self.bank_squares)

    def components(
        self, tokens: torch.Tensor, distance: torch.Tensor, position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Token scores ``(B, L)`` of the anomaly map (the Gaussian's ``distance`` ``(B, L)`` plus the nearest-token
        distance, each in its z-units), of the image score with ``position`` (the per-position distances
        ``(B, L)``: the same sum made with them; else None), and the nearest-token distance in its z-units."""
        nearest = self.z(self.distance(tokens), NEAREST)
        image = None
        if position is not None:
            if not self.has_position_units:
                msg = (
                    "the nearest-token score's image z-units are not fitted: refit with "
                    "Fod.fit_residual_statistics(datamodule)."
                )
                raise RuntimeError(msg)
            image = (position - self.position_units[0]) / self.position_units[1] + nearest
        return self.z(distance, MAP) + nearest, image, nearest

    def z(self, values: torch.Tensor, at: int) -> torch.Tensor:
        """``values`` in the z-units stored at ``at`` of ``units`` (``MAP`` or ``NEAREST``)."""
        return (values - self.units[at]) / self.units[at + 1]


def decline_unmeasured(levels: Sequence[NearestLevel], reason: str) -> None:
    """Leave the nearest-token score out of a fit that cannot measure its position share, with a warning."""
    for level in levels:
        level.decline(float("nan"))
    logger.warning(
        "FOD nearest-token score left out: %s. The per-position Gaussian scores alone; set "
        "nearest_position_limit=1.0 to require the score (the fit then refuses instead).", reason,
    )


def describe_choice(levels: Sequence[NearestLevel], limit: float) -> str:
    """One line for the run's log: whether the fitted score takes part, and the position shares that decided it."""
    if all(level.unmeasured for level in levels):
        return "FOD nearest-token score: left out, its position share could not be measured (see the warning)."
    shares = ", ".join(f"{float(level.position_share):.3f}" for level in levels)
    finest = float(levels[0].position_share)
    if all(level.declined for level in levels):
        return (
            f"FOD nearest-token score: left out. Grid position explains {finest:.3f} of the training tokens' "
            f"variation on the finest level (per level: {shares}), at or above nearest_position_limit={limit:g}: an "
            "aligned product, scored by its per-position Gaussian alone."
        )
    return (
        f"FOD nearest-token score: used. Grid position explains {finest:.3f} of the training tokens' variation on the "
        f"finest level (per level: {shares}; nearest_position_limit={limit:g}): the distance to the nearest of "
        f"{levels[0].bank.shape[0]} training tokens per level is added to the Gaussian's."
    )


def position_share(tokens: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> float:
    """Share of the variation of ``(N, L, C)`` tokens (one per training image and grid position) that their position
    explains, in the whitening ``(C,)`` ``mean``, ``(C, C)`` ``whitening`` of all of them: the variance of the
    per-position means over positions, less what N images' sampling noise puts there, over that plus the variance
    within positions. 0: every position sees the same looks (a texture); 1: a token is told by its position."""
    count = tokens.shape[0]
    check_share_count(count)
    white = (tokens.float() - mean.float()) @ whitening.float()
    means = white.double().mean(dim=0)
    within = float((white - means.float()).square().sum(dim=-1).double().mean()) * count / (count - 1)
    return share_of_variation(float((means - means.mean(dim=0)).square().sum(dim=-1).mean()), within, count)


def check_share_count(count: float) -> None:
    """The position share compares positions across images: it needs at least two."""
    if count < 2:  # noqa: PLR2004
        msg = "the position share needs at least 2 training images."
        raise ValueError(msg)


def share_of_variation(spread: float, within: float, count: float) -> float:
    """The position share from whitened variances: ``spread`` of the per-position means over positions, ``within``
    (unbiased) around them, over ``count`` images, whose sampling noise (``within / count``) is taken off the spread."""
    between = spread - within / count
    return min(1.0, max(0.0, between / (between + within)))


def _moments(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(2,)`` mean and standard deviation (+1e-6) of every value in ``values``."""
    flat = torch.cat([v.flatten().double() for v in values])
    return torch.stack((flat.mean(), flat.std() + 1e-6)).float()


def _draw(tokens: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` rows of ``(M, C)`` drawn without replacement (all of them when there are fewer)."""
    if tokens.shape[0] <= size:
        return tokens
    return tokens[torch.randperm(tokens.shape[0], generator=generator)[:size]]


def held_out_units(
    statistics: ResidualStatistics,
    tokens: torch.Tensor,
    residuals: torch.Tensor,
    images: torch.Tensor,
    plain: torch.Tensor,
    size: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(4,)`` z-units of one level and the ``(2,)`` ones of its per-position distance (None when the statistics
    hold no per-position covariances; see :class:`NearestLevel`), from held-out training tokens.

    Args:
        statistics: the level's fitted statistics (their covariance and whether they keep per-position ones).
        tokens: ``(M, L, C)`` training tokens, every image at every gain; ``residuals`` the same shape.
        images: ``(M,)`` the training image each row comes from.
        plain: ``(M,)`` bool, the rows seen as they are (gain 1, or every row when no gain is 1).
        size: bank size of the final model (each fold's bank holds half of it, as each fold holds half the images).
        generator: draws the folds and the banks.
        device: where the distances are computed.
    """
    order = torch.unique(images)
    order = order[torch.randperm(len(order), generator=generator)]
    folds = (order[0::2], order[1::2])
    with_position = statistics.position_precision.numel() > 0
    kinds: tuple[ResidualCovariance | None, ...] = (None, "position") if with_position else (None,)
    collected: list[list[torch.Tensor]] = [[], [], []]
    for fit, held in (folds, folds[::-1]):
        fit_rows = torch.isin(images, fit)
        held_rows = torch.isin(images, held) & plain
        fold = ResidualStatistics(statistics.covariance, keep_position=with_position)
        accumulator = ResidualAccumulator(fold.per_position)
        for chunk in chunks(residuals[fit_rows], device):
            accumulator.add(chunk)
        fold.set(*accumulator.finish())
        for chunk in chunks(residuals[held_rows], device):
            for index, distance in enumerate(fold.distances(chunk, kinds)):
                collected[index].append(distance.cpu())
        fit_tokens = tokens[fit_rows].flatten(0, 1)
        level = NearestLevel()
        level.set_bank(*fit_whitening(fit_tokens), _draw(fit_tokens, max(1, size // 2), generator))
        level.to(device)
        for chunk in chunks(tokens[held_rows], device):
            collected[2].append(nearest_distance(level.whiten(chunk), level.bank, level.bank_squares).cpu())
    units = torch.cat((_moments(collected[0]), _moments(collected[2])))
    return units, _moments(collected[1]) if with_position else None


def batch_layout(rows: Sequence[int], gains: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M,)`` image index and ``(M,)`` plain-row mask of kept batches of ``rows`` rows each, every batch holding
    its ``B`` images once per gain, gain by gain (``fitting.iterate_pooled_features``)."""
    images, plain, offset = [], [], 0
    unit = [gain == 1 for gain in gains] if any(gain == 1 for gain in gains) else [True] * len(gains)
    for count in rows:
        batch, left = divmod(count, len(gains))
        if left:
            msg = f"a kept batch of {count} rows does not hold {len(gains)} gains' copies of its images."
            raise ValueError(msg)
        images.append(torch.arange(offset, offset + batch).repeat(len(gains)))
        plain.append(torch.tensor(unit).repeat_interleave(batch))
        offset += batch
    return torch.cat(images), torch.cat(plain)


@torch.no_grad()
def fit_nearest(
    levels: Sequence[NearestLevel],
    statistics: Sequence[ResidualStatistics],
    tokens: Sequence[Sequence[torch.Tensor]],
    residuals: Sequence[Sequence[torch.Tensor]],
    gains: Sequence[float],
    size: int,
    device: torch.device,
    limit: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> bool:
    """Measure every level's position share; if the finest level's is below ``limit`` (or ``limit`` is 1), fit
    every level's bank and z-units, else decline the score. Returns whether the score is used.

    Args:
        levels: the model's nearest-token levels.
        statistics: the levels' fitted residual statistics.
        tokens: per level, the kept batches ``(R, L_i, C_i)`` of input tokens, each batch holding its ``B`` images
            once per gain (``R = len(gains) * B``, gain by gain); ``residuals`` the same of the residuals.
        gains: the intensity gains of the kept batches.
        size: bank size per level.
        device: where the distances are computed.
        limit: ``nearest_position_limit``.
        seed: the run's seed (``Fod.draw_seed``, kept in its checkpoints); ``None``: the process's
            (``torch.initial_seed()``, which ``seed_everything`` sets).
        generator: draw from this generator instead (one seeded from the run's seed that drew the kept images
            before), so that the two draws do not repeat each other's numbers.

    The folds and banks are drawn from the run's seed, not from the global RNG's state after training: a fit resumed
    from a checkpoint, in a process seeded otherwise, draws the same banks as an uninterrupted one. A declined score
    draws nothing.
    """
    images, plain = batch_layout([batch.shape[0] for batch in tokens[0]], gains)
    if len(torch.unique(images)) < 2:  # noqa: PLR2004
        if limit < 1:
            decline_unmeasured(levels, "one training image tells neither the position share nor held-out z-units")
            return False
        msg = "nearest_tokens needs at least 2 training images: its z-units come from images held out of the fit."
        raise ValueError(msg)
    level_tokens = [torch.cat(list(batches)) for batches in tokens]  # (M, L_i, C_i), once per level
    whitenings = []
    for level, kept in zip(levels, level_tokens, strict=True):
        whitenings.append(fit_whitening(kept.flatten(0, 1)))
        share = position_share(kept[plain], *whitenings[-1])
        level.position_share = torch.tensor([share], device=level.position_share.device)
    if limit < 1 and float(levels[0].position_share) >= limit:
        for level in levels:
            level.decline()
        logger.info(describe_choice(levels, limit))
        return False
    if generator is None:
        generator = run_generator(seed)
    for index, (level, stats) in enumerate(zip(levels, statistics, strict=True)):
        units, position_units = held_out_units(
            stats, level_tokens[index], torch.cat(list(residuals[index])), images, plain, size, generator, device
        )
        flat = level_tokens[index].flatten(0, 1)
        level.set_bank(*whitenings[index], _draw(flat, size, generator))
        level.to(device)
        level.set_units(units, position_units)
    logger.info(describe_choice(levels, limit))
    logger.info(
        "FOD nearest-token score: banks of %s tokens from %d training images; held-out z-units (mean, std) of the "
        "map's, the nearest and the per-position distance, per level: %s",
        "/".join(str(level.bank.shape[0]) for level in levels),
        len(torch.unique(images)),
        "; ".join(
            ", ".join(f"{v:.3g}" for v in [*level.units.tolist(), *level.position_units.tolist()]) for level in levels
        ),
    )
    return True
