"""A Gaussian model of the training images' reconstruction residuals: a scale-free reconstruction score.

FOD's reconstruction term compares a token ``x`` with its reconstruction ``x_hat``. Its MSE is as
large as the backbone's channels are (at stride 8 of EfficientNet-Lite0 it is in the tens and ranks
defects *below* normal tokens on some data), and ``1 - cos`` ignores how far a token moved. Both
ignore what the residual ``r = x - x_hat`` looks like on normal images. Here each level keeps, from
the training images after training, the mean residual of every token position ``mu_l`` ``(L, C)``
and one covariance of the residuals around those means ``Sigma`` ``(C, C)`` shared by all positions
(a few hundred images estimate one per position poorly), and a token is scored by its Mahalanobis
distance ``sqrt((r - mu_l)^T Sigma^-1 (r - mu_l))``: a residual is judged against the residuals the
model makes on normal images, channel by channel and with their correlations.

With ``residual_covariance="position"`` each position keeps its own covariance ``Sigma_l``
``(L, C, C)``, shrunk towards the shared one: ``(1 - w) Sigma_l + w Sigma`` with ``w = C / (N + C)``
for ``N`` training images (half the shared covariance when there are as many images as channels).
That helps where positions differ and images are aligned, and adds estimation noise where they do
not. ``residual_covariance="blend"`` scores a token by the mean of its two distances, under the shared
and under its own position's covariance: most of the per-position gain in image AUROC where parts are
aligned, without its loss of localisation where they are not.

The statistics are buffers, so they are saved in checkpoints and become constants of an exported
graph, like the reference features. This module holds the statistics and their estimate from summed
residuals; the pass over the training images that feeds it is ``fitting.fit_statistics``, run by
``callbacks.ResidualStatisticsCallback`` during a fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import get_args

import torch
from torch import nn

from .settings import ResidualCovariance

# Sums over the processes of a distributed fit (``trainer.strategy.reduce(tensor, reduce_op="sum")``).
Reduce = Callable[[torch.Tensor], torch.Tensor]

# Added to the covariance's diagonal, as a share of its mean variance: keeps the inverse finite when
# the training images span fewer directions than there are channels.
SHRINKAGE = 0.01


def adopt_stored_shapes(module: nn.Module, state_dict: dict, prefix: str, names: Iterable[str]) -> None:
    """Give ``module``'s buffers ``names`` the shapes stored in ``state_dict``, so statistics fitted on any grid
    load into a module built before the fit (its buffers are empty until then)."""
    for name in names:
        stored, current = state_dict.get(prefix + name), getattr(module, name)
        if stored is not None and stored.shape != current.shape:
            setattr(module, name, current.new_empty(stored.shape))


def forgive_missing(prefix: str, names: Iterable[str], missing_keys: list[str], before: set[str]) -> list[str]:
    """Remove from ``missing_keys`` the buffers ``names`` that this load found missing (not those missing
    ``before`` it): an older checkpoint without them still loads. Returns the names forgiven."""
    forgiven = [name for name in names if prefix + name in missing_keys and prefix + name not in before]
    for name in forgiven:
        missing_keys.remove(prefix + name)
    return forgiven


def run_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for a fit's random draws, seeded with the run's seed (``Fod.draw_seed``, kept in checkpoints;
    ``None``: the process's, ``torch.initial_seed()``), not the global RNG's state after training: a fit resumed in
    a process seeded otherwise draws what the uninterrupted one did."""
    return torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)


# Images per chunk of the passes over kept training tokens (context and nearest-token fits).
CHUNK = 32


def chunks(tensor: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
    """``tensor`` ``(N, ...)`` in chunks of ``CHUNK`` rows, each moved to ``device``."""
    for start in range(0, tensor.shape[0], CHUNK):
        yield tensor[start : start + CHUNK].to(device)


def per_position_bytes(grids: Iterable[tuple[int, int]], channels: Iterable[int]) -> int:
    """Bytes of the float64 ``(L, C, C)`` sums a per-position fit keeps for levels of these grids and channels."""
    return sum(8 * h * w * c * c for (h, w), c in zip(grids, channels, strict=True))


class ResidualStatistics(nn.Module):
    """Per-position mean and precisions of one level's residuals; empty until fitted.

    Buffers: ``mean`` ``(L, C)``, ``precision`` ``(C, C)`` (of the covariance shared by all positions)
    and, unless ``covariance="shared"`` without ``keep_position``, ``position_precision`` ``(L, C, C)``
    (one per position).

    Args:
        covariance: which distance a token gets by default: under the shared covariance (``"shared"``),
            under its position's own (``"position"``) or the mean of the two (``"blend"``).
        keep_position: fit the per-position precisions even when ``covariance`` does not read them (they
            are asked for by name, e.g. for the image score: ``forward(residual, "position")``).
    """

    def __init__(self, covariance: ResidualCovariance = "shared", keep_position: bool = False) -> None:
        super().__init__()
        if covariance not in get_args(ResidualCovariance):
            msg = f"covariance must be one of {get_args(ResidualCovariance)}, got {covariance!r}."
            raise ValueError(msg)
        self.covariance = covariance
        self.keep_position = keep_position
        self.register_buffer("mean", torch.empty(0, 0))
        self.register_buffer("precision", torch.empty(0, 0))
        self.register_buffer("position_precision", torch.empty(0, 0, 0))

    @property
    def per_position(self) -> bool:
        """Whether the fit must keep one covariance per token position."""
        return self.covariance != "shared" or self.keep_position

    @property
    def fitted(self) -> bool:
        """Whether statistics have been fitted (or loaded)."""
        return self.mean.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:  # noqa: ANN001
        """Load statistics of any shape (the buffers take the stored ones'); older checkpoints load too: without
        statistics (empty, fit them to use them), or with the per-position precisions stored as ``precision``
        ``(L, C, C)`` (moved to ``position_precision``)."""
        old = state_dict.get(prefix + "precision")
        if old is not None and old.dim() == 3 and prefix + "position_precision" not in state_dict:  # noqa: PLR2004
            state_dict[prefix + "position_precision"] = state_dict.pop(prefix + "precision")
        adopt_stored_shapes(self, state_dict, prefix, ("mean", "precision", "position_precision"))
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        forgive_missing(prefix, ("mean", "precision", "position_precision"), missing_keys, before)

    def set(self, mean: torch.Tensor, precision: torch.Tensor, position_precision: torch.Tensor | None = None) -> None:
        """Store ``(L, C)`` means, the shared ``(C, C)`` precision and the per-position ``(L, C, C)`` ones."""
        self.mean = mean.detach().float()
        self.precision = precision.detach().float()
        if position_precision is None:
            self.position_precision = torch.empty(0, 0, 0, device=mean.device)
        else:
            self.position_precision = position_precision.detach().float()

    def _check(self, residual: torch.Tensor, covariance: ResidualCovariance) -> None:
        if not self.fitted:
            msg = (
                "FOD's residual statistics are missing: reconstruction_term='mahalanobis' scores residuals "
                "against those of the training images, fitted after training. Train the model, or fit them on "
                "a trained checkpoint with Fod.fit_residual_statistics(datamodule)."
            )
            raise RuntimeError(msg)
        if residual.shape[1:] != self.mean.shape:
            msg = (
                f"residual statistics were fitted on {tuple(self.mean.shape)} (tokens, channels), this input gives "
                f"{tuple(residual.shape[1:])}: use the image size the model was trained with."
            )
            raise RuntimeError(msg)
        has_shared, has_position = self.precision.numel() > 0, self.position_precision.numel() > 0
        needs_shared, needs_position = covariance != "position", covariance != "shared"
        if (needs_shared and not has_shared) or (needs_position and not has_position):
            held = " and ".join(
                kind
                for kind, has in (("one shared covariance", has_shared), ("one covariance per position", has_position))
                if has
            )
            msg = (
                f"the residual statistics hold {held} but the {covariance!r} distance (asked for by the model's "
                f"residual_covariance or image_score) needs {'both' if covariance == 'blend' else 'the other'}: refit "
                "them with Fod.fit_residual_statistics(datamodule)."
            )
            raise RuntimeError(msg)

    def forward(self, residual: torch.Tensor, covariance: ResidualCovariance | None = None) -> torch.Tensor:
        """Mahalanobis distance of every token, ``(B, L, C)`` -> ``(B, L)``, under ``covariance``
        (default: this module's ``covariance``)."""
        return self.distances(residual, (covariance,))[0]

    def distances(
        self, residual: torch.Tensor, covariances: Sequence[ResidualCovariance | None]
    ) -> list[torch.Tensor]:
        """The distances ``(B, L)`` of ``residual`` ``(B, L, C)`` under each of ``covariances`` (None: this module's),
        each of the shared and per-position parts computed once for all of them (the per-position one is a
        batched ``(L, B, C) @ (L, C, C)`` product, the costly part of scoring)."""
        covariances = [covariance or self.covariance for covariance in covariances]
        for covariance in dict.fromkeys(covariances):
            self._check(residual, covariance)
        centred = residual.float() - self.mean
        shared = position = None
        if any(covariance != "position" for covariance in covariances):
            shared = ((centred @ self.precision) * centred).sum(-1).clamp_min(0.0).sqrt()
        if any(covariance != "shared" for covariance in covariances):
            position = self._position_distance(centred)
        by_name = {"shared": shared, "position": position}
        return [
            by_name[covariance] if covariance in by_name else 0.5 * (shared + position)  # type: ignore[operator]
            for covariance in covariances
        ]

    def _position_distance(self, centred: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` distances of centred residuals under each position's own covariance: one batched matmul
        ``(L, B, C) @ (L, C, C)``, which every exporter handles."""
        whitened = (centred.transpose(0, 1) @ self.position_precision).transpose(0, 1)
        return (whitened * centred).sum(-1).clamp_min(0.0).sqrt()


class ResidualAccumulator:
    """Running float64 sums of one level's residuals ``(B, L, C)``, and the statistics they give.

    ``per_position``: keep every position's outer products ``(L, C, C)`` (their sum over positions
    is the shared one) for per-position covariances.
    """

    def __init__(self, per_position: bool = False) -> None:
        self.per_position = per_position
        self.count = 0.0
        self.sum: torch.Tensor | None = None  # (L, C)
        self.outer: torch.Tensor | None = None  # (C, C), or (L, C, C) per position

    def add(self, residual: torch.Tensor) -> None:
        """Add a batch of residuals ``(B, L, C)``."""
        r = residual.detach().double()
        if self.sum is None:
            self.sum = torch.zeros(r.shape[1:], dtype=torch.float64, device=r.device)
            shape = (*r.shape[1:], r.shape[-1]) if self.per_position else (r.shape[-1], r.shape[-1])
            self.outer = torch.zeros(shape, dtype=torch.float64, device=r.device)
        self.sum += r.sum(dim=0)
        if self.per_position:
            by_position = r.transpose(0, 1)  # (L, B, C)
            self.outer += by_position.transpose(1, 2) @ by_position
        else:
            flat = r.flatten(0, 1)
            self.outer += flat.T @ flat
        self.count += r.shape[0]

    def sums(self, reduce: Reduce | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running sums (of residuals ``(L, C)``, of their outer products, the count), summed over the
        processes of a distributed fit with ``reduce``."""
        if self.sum is None or self.outer is None:
            msg = "no training images: FOD needs them to fit its residual statistics."
            raise RuntimeError(msg)
        total, outer = self.sum, self.outer
        count = torch.tensor(self.count, dtype=torch.float64, device=total.device)
        if reduce is not None:
            total, outer, count = reduce(total), reduce(outer), reduce(count)
        return total, outer, count

    def finish(
        self,
        reduce: Reduce | None = None,
        sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(L, C)`` means, the precision ``(C, C)`` of the pooled within-position covariance and, per
        position, ``(L, C, C)`` those of each position's covariance shrunk towards the pooled one (else None).

        ``reduce``: sums the running sums over the processes of a distributed fit first. ``sums``: what
        :meth:`sums` already gave (a caller that read them first does not sum over the processes twice).
        """
        total, outer, count = self.sums(reduce) if sums is None else sums
        mean = total / count
        positions, channels = mean.shape
        pooled = outer.sum(dim=0) if self.per_position else outer
        # sum over images and positions of (r - mu_l)(r - mu_l)^T = sum r r^T - N sum_l mu_l mu_l^T
        cov = (pooled - count * mean.T @ mean) / (count * positions - 1).clamp_min(1)
        cov = cov + SHRINKAGE * cov.diagonal().mean() * torch.eye(channels, dtype=cov.dtype, device=cov.device)
        position_precision = None
        if self.per_position:
            # sum over images of (r - mu_l)(r - mu_l)^T = sum r r^T - N mu_l mu_l^T, at every position l
            own = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1).clamp_min(1)
            weight = channels / (count + channels)
            position_precision = torch.linalg.inv((1 - weight) * own + weight * cov).float()
        return mean.float(), torch.linalg.inv(cov).float(), position_precision
