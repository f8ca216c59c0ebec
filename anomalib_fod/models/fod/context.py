"""The context score: each token against what its surroundings predict, never against itself.

FOD's reconstruction sees the token it rebuilds (through its residual connections and its own query), so
its residual is nearly the token's own deviation from normal, and the whitened residual ranks tokens as a
Gaussian over the input features does: training changes the score by nothing measurable. The paper's idea of
a discrepancy is "this patch against its context". Here that idea is made strict, per level:

- the tokens are whitened (one mean and one symmetric whitening over every training token);
- a :class:`ContextPredictor` predicts every whitened token from the others by cross-attention: its query
  stream starts from one learned vector plus the token's 2D sine-cosine position (no content of the token),
  and every key within ``radius`` grid cells of the query is masked. With 3x3-pooled features radius 2 is
  the smallest that hides every token whose pooling window holds the query's own cell;
- the context residual (token minus prediction) is scored like the reconstruction residual: its Mahalanobis
  distance against the training images' context residuals (shared and per-position covariance, averaged);
- the token's score is that distance plus the reconstruction residual's distance, each in z-units of the
  training images at the token's position (so neither dominates by its scale); for the image score the same
  sum is also made of the two distances under each position's own covariance (``Fod()``'s image rule);
- at inference the ``hidden_share`` most unusual tokens of each image (by the reconstruction distance, a rule
  of the image alone) are hidden from every query: a defect would otherwise spoil its neighbours' predictions
  and smear its own score into a ring around it.

Everything needed at inference is a parameter or a buffer of :class:`ContextLevel`, so checkpoints and
exported graphs carry it. The fit (whitening, optimizer steps, residual statistics, z-units) is
``fitting.fit_context``; this module holds the modules and the torch-only training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm.auto import tqdm

from .grid import grid_coordinates, sincos_embedding
from .residual_statistics import SHRINKAGE, ResidualStatistics, adopt_stored_shapes, forgive_missing, run_generator

# The predictor's size and recipe, as screened (benchmarks/notes/2026-12-05-context-predictor.md).
WIDTH = 128
LAYERS = 2
HEADS = 4
BATCH = 8
LEARNING_RATE = 1e-3
# Added to masked attention logits: finite, so a query that sees no key gives a finite answer (its attention
# output is then dropped: such a query predicts from its position alone).
MASKED = -1.0e4


class CrossAttention(nn.Module):
    """Multi-head attention of a query stream ``(B, L, D)`` to a memory ``(B, L, D)`` under an additive bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias``: ``(B or 1, 1, L, L)`` added to the logits (``MASKED`` where a key may not be read)."""
        batch, length, dim = query.shape
        head_dim = dim // self.heads
        q = self.query(query).reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        k, v = self.key_value(memory).reshape(batch, -1, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class ContextPredictor(nn.Module):
    """``(B, L, C)`` whitened tokens -> ``(B, L, C)`` each token predicted from the tokens beyond ``radius``.

    Args:
        channels: token channels ``C``.
        radius: grid cells (Chebyshev distance) around the query whose tokens it may not read.
        dim, layers, heads: width, cross-attention layers and heads of the query stream.
    """

    def __init__(self, channels: int, radius: int = 2, dim: int = WIDTH, layers: int = LAYERS, heads: int = HEADS) -> None:
        super().__init__()
        self.radius = radius
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.attention = nn.ModuleList(CrossAttention(dim, heads) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers))
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers)
        )
        self.out = nn.Linear(dim, channels)

    def forward(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        hidden: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the tokens of ``tokens`` ``(B, L, C)`` on the ``(h, w)`` grid from their context.

        ``hidden``: ``(B, L)`` bool, tokens no query may read (each image's most unusual ones).
        ``queries``: ``(Q,)`` indices of the positions to predict, ``(B, Q, C)`` out (default: all ``L``). The
        queries never read each other, so a subset's predictions equal the full pass's at those positions.
        A query left nothing to read (every key near or hidden) predicts from its position alone.
        """
        cells = grid_coordinates(*grid, tokens.device)
        positions = sincos_embedding(cells, self.dim)
        asked = cells if queries is None else cells[queries]
        near = (asked[:, None] - cells[None]).abs().amax(dim=-1) <= self.radius  # (Q, L) Chebyshev neighbourhood
        bias = near.to(tokens.dtype)[None, None] * MASKED
        if hidden is not None:
            bias = bias + hidden.to(tokens.dtype)[:, None, None, :] * MASKED
        # (B or 1, Q, 1): 0 where a query may read no key (its masked softmax would average every token, its own
        # included)
        reads = (bias > 0.5 * MASKED).any(dim=-1).transpose(1, 2).to(tokens.dtype)
        memory = self.embed(tokens) + positions
        query = (self.query + (positions if queries is None else positions[queries])).expand(tokens.shape[0], -1, -1)
        for index, (attention, ffn) in enumerate(zip(self.attention, self.ffn, strict=True)):
            query = query + attention(self.norms[2 * index](query), memory, bias) * reads
            query = query + ffn(self.norms[2 * index + 1](query))
        return self.out(query)


class ContextLevel(nn.Module):
    """One level's context score: whitening, predictor, context-residual statistics and z-units.

    Buffers (empty until fitted): ``token_mean`` ``(C,)`` and ``whitening`` ``(C, C)`` of the input tokens;
    ``rec_mean`` / ``rec_std`` and ``ctx_mean`` / ``ctx_std`` ``(L,)``, the training images' per-position mean
    and standard deviation of the reconstruction and context distances (the z-units); ``rec_pos_mean`` /
    ``rec_pos_std`` and ``ctx_pos_mean`` / ``ctx_pos_std`` ``(L,)``, the same of the distances under each
    position's own covariance (the image score's; empty in checkpoints saved before it, whose image score is
    the map's maximum). ``statistics`` holds the context residuals' Gaussian
    (:class:`~.residual_statistics.ResidualStatistics`, ``"blend"``).

    Args:
        channels: token channels ``C``.
        radius: see :class:`ContextPredictor`.
        hidden_share: share of each image's tokens hidden from every query at inference (0: none).
    """

    POSITION_UNITS = ("rec_pos_mean", "rec_pos_std", "ctx_pos_mean", "ctx_pos_std")
    UNITS = ("rec_mean", "rec_std", "ctx_mean", "ctx_std", *POSITION_UNITS)
    BUFFERS = ("token_mean", "whitening", *UNITS)

    def __init__(self, channels: int, radius: int = 2, hidden_share: float = 0.05) -> None:
        super().__init__()
        self.hidden_share = hidden_share
        self.predictor = ContextPredictor(channels, radius)
        self.statistics = ResidualStatistics("blend")
        self.register_buffer("token_mean", torch.empty(0))
        self.register_buffer("whitening", torch.empty(0, 0))
        for name in self.UNITS:
            self.register_buffer(name, torch.empty(0))

    @property
    def fitted(self) -> bool:
        """Whether the whitening, statistics and z-units have been fitted (or loaded)."""
        return self.ctx_std.numel() > 0 and self.statistics.fitted

    @property
    def has_position_units(self) -> bool:
        """Whether the image score's z-units (distances under each position's own covariance) are fitted."""
        return self.ctx_pos_std.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:  # noqa: ANN001
        """The buffers take the stored shapes (they are empty until a fit); a checkpoint saved before the image
        score's z-units loads without them."""
        adopt_stored_shapes(self, state_dict, prefix, self.BUFFERS)
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        for name in forgive_missing(prefix, self.POSITION_UNITS, missing_keys, before):
            setattr(self, name, torch.empty(0, device=self.ctx_std.device))

    def set_whitening(self, mean: torch.Tensor, whitening: torch.Tensor) -> None:
        """Store the tokens' ``(C,)`` mean and ``(C, C)`` whitening."""
        self.token_mean = mean.detach().float()
        self.whitening = whitening.detach().float()

    def set_units(
        self,
        rec: torch.Tensor,
        ctx: torch.Tensor,
        rec_position: torch.Tensor | None = None,
        ctx_position: torch.Tensor | None = None,
    ) -> None:
        """Store the z-units from the training images' ``(N, L)`` reconstruction and context distances (and, for
        the image score, the same under each position's own covariance)."""
        self.rec_mean, self.rec_std = _units(rec)
        self.ctx_mean, self.ctx_std = _units(ctx)
        if rec_position is None or ctx_position is None:
            self.rec_pos_mean, self.rec_pos_std, self.ctx_pos_mean, self.ctx_pos_std = (rec.new_empty(0),) * 4
            return
        self.rec_pos_mean, self.rec_pos_std = _units(rec_position)
        self.ctx_pos_mean, self.ctx_pos_std = _units(ctx_position)

    def whiten(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` tokens in whitened coordinates."""
        return (tokens.float() - self.token_mean) @ self.whitening

    def _check(self, rec: torch.Tensor) -> None:
        if not self.fitted:
            msg = (
                "FOD's context score is not fitted: its whitening, predictor and statistics are fitted on the "
                "training images after training. Train the model, or fit them on a trained checkpoint with "
                "Fod.fit_residual_statistics(datamodule)."
            )
            raise RuntimeError(msg)
        if rec.shape[1] != self.rec_mean.shape[0]:
            msg = (
                f"the context score was fitted on {self.rec_mean.shape[0]} tokens per level, this input gives "
                f"{rec.shape[1]}: use the image size the model was trained with."
            )
            raise RuntimeError(msg)

    def hidden(self, rec_z: torch.Tensor) -> torch.Tensor | None:
        """``(B, L)`` bool: each image's ``hidden_share`` of tokens with the largest ``rec_z`` (None when 0)."""
        count = math.ceil(self.hidden_share * rec_z.shape[1])
        if count == 0:
            return None
        threshold = rec_z.topk(count, dim=1).values[:, -1:]
        return rec_z >= threshold

    def components(
        self,
        tokens: torch.Tensor,
        rec: torch.Tensor,
        grid: tuple[int, int],
        rec_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The reconstruction and context distances ``(B, L)`` in z-units, from the input tokens ``(B, L, C)`` and
        their reconstruction distances ``(B, L)``; with ``rec_position`` (the reconstruction distances under each
        position's own covariance, ``(B, L)``) also the image score's token scores ``(B, L)``: both distances
        under each position's own covariance in their z-units, added (else None). One predictor pass."""
        self._check(rec)
        rec_z = (rec - self.rec_mean) / self.rec_std
        whitened = self.whiten(tokens)
        residual = whitened - self.predictor(whitened, grid, self.hidden(rec_z))
        if rec_position is None:
            return rec_z, (self.statistics(residual) - self.ctx_mean) / self.ctx_std, None
        if not self.has_position_units:
            msg = "the context score's image z-units are not fitted: refit with Fod.fit_residual_statistics(datamodule)."
            raise RuntimeError(msg)
        # the blended distance holds the per-position one: one batched product gives both
        ctx, ctx_position = self.statistics.distances(residual, (None, "position"))
        image = (rec_position - self.rec_pos_mean) / self.rec_pos_std + (
            ctx_position - self.ctx_pos_mean
        ) / self.ctx_pos_std
        return rec_z, (ctx - self.ctx_mean) / self.ctx_std, image

    def forward(self, tokens: torch.Tensor, rec: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Token scores ``(B, L)`` of the anomaly map: the reconstruction and context z-scores, added."""
        rec_z, ctx_z, _ = self.components(tokens, rec, grid)
        return rec_z + ctx_z


def _units(distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean and standard deviation (+1e-6) of ``(N, L)`` training distances, ``(L,)`` each."""
    return distances.mean(dim=0).float(), distances.std(dim=0).float() + 1e-6


def fit_whitening(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C,)`` mean and symmetric ``(C, C)`` whitening of ``(M, C)`` tokens (covariance shrunk like the residuals')."""
    tokens = tokens.double()
    mean = tokens.mean(dim=0)
    centred = tokens - mean
    cov = centred.T @ centred / max(1, tokens.shape[0] - 1)
    cov += SHRINKAGE * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    values, vectors = torch.linalg.eigh(cov)
    return mean.float(), ((vectors * values.rsqrt()) @ vectors.T).float()


def train_predictors(
    levels: Sequence[ContextLevel],
    tokens: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    steps: int,
    device: torch.device,
    progress: bool = True,
    log: Callable[[int, float], None] | None = None,
    query_share: float = 1.0,
    seed: int | None = None,
) -> list[float]:
    """Train every level's predictor to predict whitened tokens ``(N, L_i, C_i)`` (kept where they are; each
    step moves ``BATCH`` random images to ``device``). Adam, MSE summed over the levels. Returns the loss of every
    step; ``log(step, loss)`` is called every 50 steps and at the last.

    The batches and query positions are drawn from ``seed`` (the run's, ``Fod.draw_seed``; ``None``: the process's,
    ``torch.initial_seed()``), not from the global RNG's state after training: a fit resumed from a checkpoint in a
    process seeded otherwise trains the predictors as an uninterrupted one does.

    ``query_share``: share of each level's positions predicted per step, a fresh random subset each step. The
    cost of a step is mostly its queries' attention and feed-forward, so a quarter of them makes a step about
    3x cheaper and the loss stays an unbiased estimate of the full one."""
    predictors = [level.predictor for level in levels]
    parameters = [p for predictor in predictors for p in predictor.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    count = tokens[0].shape[0]
    generator = run_generator(seed)
    losses = []
    for predictor in predictors:
        predictor.train()
    try:
        for step in tqdm(range(steps), desc="FOD context predictor", disable=not progress, leave=False):
            index = torch.randint(count, (min(BATCH, count),), generator=generator)
            loss = 0.0
            for predictor, t, grid in zip(predictors, tokens, grids, strict=True):
                batch = t[index].to(device)
                if query_share >= 1:
                    loss = loss + F.mse_loss(predictor(batch, grid), batch)
                    continue
                drawn = torch.randperm(batch.shape[1], generator=generator)[: math.ceil(query_share * batch.shape[1])]
                queries = drawn.to(device)
                loss = loss + F.mse_loss(predictor(batch, grid, queries=queries), batch[:, queries])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                msg = f"the context predictor's loss became {losses[-1]} at step {step + 1}."
                raise FloatingPointError(msg)
            if log is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
                log(step + 1, losses[-1])
    finally:
        for predictor in predictors:
            predictor.eval()
    return losses
