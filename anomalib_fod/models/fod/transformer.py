"""The I2Correlation Transformer of FOD: one per feature level.

Each layer runs self-attention over the image tokens (intra-image correlations) and
cross-attention from the image tokens to the reference tokens (inter-image correlations).
Every attention that takes part in the correlation game also predicts, per query and head,
two sigmas of a Gaussian prior over positions (the *target correlation*). The layer returns
per-token statistics of each branch (symmetric KL to the target and entropy) rather than the
``(B, H, L, S)`` maps, so the maps can be freed layer by layer.

Everything that depends on the token grid (positions, distances, positional embeddings) is
derived from the feature-map size at call time, so any input size works.

ED ("Emphasize Differences") changes three parts of this Transformer; each is a setting here so
ED is a preset of FOD rather than a second copy of it: ``fusion="concat_mlp"`` (instead of
subtracting the branches), ``learnable_temperature`` / ``relative_position_bias`` in the attention,
and ``ffn="dwconv_median"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components import DynamicBufferMixin
from torch import nn

from .blocked_attention import correlation_attention_inference, correlation_attention_training, target_block
from .correlation import KeyGeometry, correlation_stats, sigma_from_logits
from .grid import grid_coordinates, sincos_embedding
from .settings import FodSettings


def grid_geometry(queries: torch.Tensor, height: int, width: int) -> KeyGeometry:
    """Geometry of ``(L, 2)`` query positions against the full ``height x width`` key grid."""
    key_rows = torch.arange(height, device=queries.device, dtype=torch.float32)
    key_cols = torch.arange(width, device=queries.device, dtype=torch.float32)
    rows = (queries[:, 0:1] - key_rows).square()
    cols = (queries[:, 1:2] - key_cols).square()
    return KeyGeometry(rows, cols, separable=True)


def squared_distances(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared row and column distances ``(L, S)`` between ``(L, 2)`` and ``(S, 2)`` coordinates."""
    diff = queries[:, None, :] - keys[None, :, :]
    return diff[..., 0].square(), diff[..., 1].square()


@dataclass
class BranchStats:
    """Per-token statistics of one correlation branch in one layer, each ``(B, L)``.

    ``kl_attention`` is computed with the target detached (its gradient reaches only the
    attention), ``kl_target`` with the attention detached (its gradient reaches only the
    sigma projection). Without autograd both are the same tensor.
    """

    kl_attention: torch.Tensor
    kl_target: torch.Tensor
    entropy: torch.Tensor
    maps: tuple[torch.Tensor, torch.Tensor] | None = None  # (attention, target) when requested


@dataclass
class LevelOutput:
    """What one level's Transformer returns.

    Attributes:
        reconstruction: ``(B, L, C)`` reconstructed input features.
        intra: per-layer statistics of the intra-correlation branch (empty when off).
        inter: per-layer statistics of the inter-correlation branch (empty when off).
    """

    reconstruction: torch.Tensor
    intra: list[BranchStats] = field(default_factory=list)
    inter: list[BranchStats] = field(default_factory=list)


def branch_stats(attention: torch.Tensor, target: torch.Tensor, keep_maps: bool = False) -> BranchStats:
    """Symmetric KLs (with the minimax detach pattern) and entropy of ``(B, H, L, S)`` maps.

    Always in float32, also under bf16/fp16 autocast: the logarithms of near-zero probabilities
    and the sums over ``S`` keys lose too much in 8 mantissa bits.
    """
    device_type = attention.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            kl_attention, kl_target, ent = correlation_stats(attention.float(), target.float())
    else:
        kl_attention, kl_target, ent = correlation_stats(attention, target)
    maps = (attention, target) if keep_maps else None
    return BranchStats(kl_attention, kl_target, ent, maps)


@dataclass
class RelativeOffsets:
    """Integer (row, column) offsets between queries and keys, indexed into a table of unique offsets.

    Attributes:
        table: ``(T, 2)`` float unique offsets ``(dy, dx)``, ``T = (2h - 1)(2w - 1)``.
        index: ``(L, S)`` long: row of ``table`` holding the offset of query ``l`` to key ``s``.
    """

    table: torch.Tensor
    index: torch.Tensor


def relative_offsets(queries: torch.Tensor, keys: torch.Tensor, height: int, width: int) -> RelativeOffsets:
    """Offsets of ``(S, 2)`` key positions from ``(L, 2)`` query positions on a ``height x width`` grid."""
    dy = torch.arange(-(height - 1), height, device=queries.device, dtype=torch.float32)
    dx = torch.arange(-(width - 1), width, device=queries.device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2)
    diff = (keys[None, :, :] - queries[:, None, :]).round().long()  # (L, S, 2)
    index = (diff[..., 0] + height - 1) * (2 * width - 1) + (diff[..., 1] + width - 1)
    return RelativeOffsets(table, index)


class RelativePositionBias(nn.Module):
    """Learned attention bias per head as a function of the query-to-key offset (ED, optional).

    A small MLP of log-scaled offsets (as in Swin V2's continuous position bias) rather than a
    table of free parameters, so the same weights serve every grid size. Its output layer starts
    at zero: the bias is off until training finds a use for it.
    """

    def __init__(self, num_heads: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, num_heads))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, offsets: RelativeOffsets) -> torch.Tensor:
        """``(H, L, S)`` bias added to the attention logits."""
        scaled = torch.sign(offsets.table) * torch.log2(1.0 + offsets.table.abs())
        per_offset = self.mlp(scaled).transpose(0, 1)  # (H, T)
        return per_offset[:, offsets.index]


class CorrelationAttention(nn.Module):
    """Multi-head attention that also returns its attention map and a learned Gaussian target.

    Args:
        d_model: token width.
        settings: reads ``num_heads``, ``dropout`` (on the attention probabilities),
            ``out_projection`` (off by default, as in the paper's code, which computes it and throws
            the result away: with it, FOD left chance in its first epoch less reliably, see
            ``docs/differences.md``), ``learnable_temperature`` (ED: learn the logit scale,
            initialised to ``1 / sqrt(head dim)`` and kept positive through its logarithm) and
            ``relative_position_bias`` (ED: a learned bias of the query-to-key offset).
        with_target: predict per-query sigmas and the Gaussian target correlation.
    """

    def __init__(self, d_model: int, settings: FodSettings, with_target: bool = True) -> None:
        super().__init__()
        num_heads = settings.num_heads
        if d_model % num_heads:
            msg = f"d_model ({d_model}) must be divisible by num_heads ({num_heads})."
            raise ValueError(msg)
        self.num_heads = num_heads
        self.scale = (d_model // num_heads) ** -0.5
        self.log_temperature = (
            nn.Parameter(torch.tensor(math.log(self.scale))) if settings.learnable_temperature else None
        )
        self.position_bias = RelativePositionBias(num_heads) if settings.relative_position_bias else None
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.sigma = nn.Linear(d_model, 2 * num_heads) if with_target else None
        self.proj = nn.Linear(d_model, d_model) if settings.out_projection else nn.Identity()
        self.dropout = nn.Dropout(settings.dropout)
        self.compile_kernels = settings.compile_kernels

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        geometry: KeyGeometry | None = None,
        offsets: RelativeOffsets | None = None,
        keep_maps: bool = False,
    ) -> tuple[torch.Tensor, BranchStats | None]:
        """Attend from ``x`` to ``context``.

        Args:
            x: ``(B, L, D)`` queries.
            context: ``(B, S, D)`` or ``(1, S, D)`` keys/values (a batch of 1 is broadcast).
            geometry: query/key distances; the target and the branch statistics are computed only
                when given (and this attention has a sigma projection).
            offsets: query-to-key offsets, needed with ``relative_position_bias``.
            keep_maps: also return the ``(B, H, L, S)`` attention and target maps (for figures).

        Returns:
            ``(B, L, D)`` output, and the branch statistics or ``None``.
        """
        batch, length, width = x.shape
        scale = self.scale if self.log_temperature is None else self.log_temperature.exp()
        query = self._heads(self.query(x)) * scale
        key = self._heads(self.key(context))
        value = self._heads(self.value(context))
        with_stats = self.sigma is not None and geometry is not None
        if self._needs_maps(keep_maps):
            if self.position_bias is not None and offsets is None:
                msg = "relative_position_bias needs the query-to-key offsets."
                raise ValueError(msg)
            out, stats = self._plain(query, key, value, x, geometry if with_stats else None, offsets, keep_maps)
        elif not with_stats:
            # Only the output is needed: a fused kernel that never writes the (B, H, L, S) map.
            key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
            out = F.scaled_dot_product_attention(query, key, value, scale=1.0)
            stats = None
        else:
            inv = self._target_scales(x)
            if self.training and torch.is_grad_enabled():
                out, kl_attention, kl_target, entropy = correlation_attention_training(
                    query, key, value, inv, geometry, compiled=self.compile_kernels
                )
                stats = BranchStats(kl_attention, kl_target, entropy)
            else:
                out, divergence, entropy = correlation_attention_inference(
                    query, key, value, inv, geometry, compiled=self.compile_kernels
                )
                stats = BranchStats(divergence, divergence, entropy)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.proj(out), stats

    def _needs_maps(self, keep_maps: bool) -> bool:
        """Whether this call must materialise its maps (the plain path).

        Figures need the maps; a position bias is itself an ``(H, L, S)`` map; attention dropout
        would need its mask in the backward; and a graph being compiled for training leaves the
        fusion to the compiler (the blocked path's autograd function is opaque to it).
        """
        if keep_maps or self.position_bias is not None:
            return True
        if not self.training:
            return False
        return self.dropout.p > 0 or (torch.is_grad_enabled() and torch.compiler.is_compiling())

    def _target_scales(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, L, 2)`` float32 ``1 / (2 sigma^2)`` of every query's Gaussian target."""
        batch, length, _ = x.shape
        # float32: in bf16, 3 ** (sigmoid + 1e-5) - 1 rounds small sigmas to 0 (an infinite prior).
        logits = self.sigma(x).float().view(batch, length, self.num_heads, 2).transpose(1, 2)
        return 0.5 / sigma_from_logits(logits).square()

    def _plain(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        x: torch.Tensor,
        geometry: KeyGeometry | None,
        offsets: RelativeOffsets | None,
        keep_maps: bool,
    ) -> tuple[torch.Tensor, BranchStats | None]:
        """The straightforward computation over full ``(B, H, L, S)`` maps (the reference of the fast paths)."""
        logits = query @ key.transpose(-2, -1)
        if self.position_bias is not None:
            logits = logits + self.position_bias(offsets).to(logits.dtype)
        attention = torch.softmax(logits, dim=-1)
        out = self.dropout(attention) @ value.to(attention.dtype)
        if geometry is None:
            return out, None
        target, _ = target_block(self._target_scales(x), geometry)
        return out, branch_stats(attention, target, keep_maps)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear -> Dropout."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, L, D)`` tokens of a ``height x width`` grid -> ``(B, L, D)``."""
        del height, width
        return self.drop(self.fc2(self.act(self.fc1(x))))


def lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Lower median along ``dim`` (``torch.median``'s convention), kept as a size-1 dimension.

    Eager code uses ``torch.median`` (a selection: on a CPU 7x faster than sorting the ``(B, L, 4D)``
    activations of a stride-8 level, a tenth of an ED training step). Graphs being exported or
    compiled take :func:`sorted_lower_median`, because ONNX has no median operator.
    """
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return sorted_lower_median(x, dim)
    return x.median(dim=dim, keepdim=True).values


def sorted_lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`lower_median` written with a sort, which every exporter supports."""
    middle = (x.shape[dim] - 1) // 2
    return x.sort(dim=dim).values.narrow(dim, middle, 1)


class ConvFeedForward(nn.Module):
    """ED's feed-forward: fc1 -> depth-wise 3x3 conv over the token grid -> GELU -> + global median -> fc2.

    The depth-wise convolution gives each token its neighbourhood; the median over all tokens of
    the image (scaled per channel, starting at zero) adds a robust image-level context that a few
    anomalous tokens cannot shift.
    """

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.median_scale = nn.Parameter(torch.zeros(hidden))
        self.fc2 = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, L, D)`` tokens of a ``height x width`` grid -> ``(B, L, D)``."""
        batch, length, _ = x.shape
        hidden = self.fc1(x).transpose(1, 2).reshape(batch, -1, height, width)
        hidden = self.act(self.conv(hidden)).flatten(2).transpose(1, 2)  # (B, L, hidden)
        hidden = hidden + self.median_scale * lower_median(hidden, dim=1)
        return self.drop(self.fc2(hidden))


class ConcatFusion(nn.Module):
    """ED's fusion of the two branches: ``Linear(2D -> 4D) -> ReLU -> Linear(4D -> D)`` on their concatenation."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * d_model, 4 * d_model), nn.ReLU(), nn.Linear(4 * d_model, d_model))

    def forward(self, intra: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        """Two ``(B, L, D)`` branch outputs -> ``(B, L, D)``."""
        return self.mlp(torch.cat((intra, inter), dim=-1))


class I2CorrelationLayer(nn.Module):
    """One encoder layer with intra (self) and inter (cross, to references) correlations.

    With both branches and ``fusion="subtract"`` the layer's residual input is
    ``(x + intra) - (x + inter)``: the I2Correlation of the paper, which makes the features depend
    on how an image's own correlations differ from its correlations to normal references.
    ``fusion="concat_mlp"`` (ED) instead feeds both residual branches, concatenated, through an
    MLP, which can learn the difference and more. With one branch it is the usual
    ``x + branch``; with none (patch-wise ablation) plain self-attention.

    Args:
        d_model: token width.
        settings: reads ``with_intra``, ``with_inter``, ``fusion``, ``ffn``, ``ffn_ratio``,
            ``dropout`` and what :class:`CorrelationAttention` reads.
    """

    def __init__(self, d_model: int, settings: FodSettings) -> None:
        super().__init__()
        with_intra, with_inter = settings.with_intra, settings.with_inter
        self.with_intra = with_intra
        self.with_inter = with_inter
        inter_only = with_inter and not with_intra
        self.self_attention = None if inter_only else CorrelationAttention(d_model, settings, with_target=with_intra)
        self.cross_attention = CorrelationAttention(d_model, settings) if with_inter else None
        both = with_intra and with_inter
        self.fusion = ConcatFusion(d_model) if (both and settings.fusion == "concat_mlp") else None
        feed_forward = ConvFeedForward if settings.ffn == "dwconv_median" else FeedForward
        self.ffn = feed_forward(d_model, settings.ffn_ratio * d_model, settings.dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(settings.dropout)

    def forward(
        self,
        x: torch.Tensor,
        reference: torch.Tensor | None,
        intra_geometry: KeyGeometry | None,
        inter_geometry: KeyGeometry | None,
        keep_maps: bool = False,
        grid: tuple[int, int] | None = None,
        intra_offsets: RelativeOffsets | None = None,
        inter_offsets: RelativeOffsets | None = None,
    ) -> tuple[torch.Tensor, BranchStats | None, BranchStats | None]:
        """Run one layer.

        Args:
            x: ``(B, L, D)`` image tokens of a ``grid = (height, width)`` grid.
            reference: ``(1, S, D)`` embedded reference tokens (inter branch only).
            intra_geometry: distances for the intra target; ``None`` skips target and statistics
                (inference does not need them when scoring uses the inter branch).
            inter_geometry: distances for the inter target; ``None`` skips them likewise.
            keep_maps: also return the attention and target maps (for figures).
            grid: token grid ``(height, width)`` of ``x``; needed by ``ffn="dwconv_median"``.
            intra_offsets: query-to-key offsets of the self-attention (relative position bias).
            inter_offsets: query-to-reference offsets of the cross-attention (likewise).

        Returns:
            ``(B, L, D)`` tokens, intra statistics or ``None``, inter statistics or ``None``.
        """
        intra = inter = None
        intra_out = inter_out = None
        if self.self_attention is not None:
            intra_out, intra = self.self_attention(x, x, intra_geometry, intra_offsets, keep_maps)
            intra_out = self.dropout(intra_out)
        if self.cross_attention is not None:
            inter_out, inter = self.cross_attention(x, reference, inter_geometry, inter_offsets, keep_maps)
            inter_out = self.dropout(inter_out)
        if intra_out is not None and inter_out is not None:
            if self.fusion is None:
                new_x = intra_out - inter_out  # (x + intra) - (x + inter): the residual x cancels
            else:
                new_x = self.fusion(x + intra_out, x + inter_out)
        else:
            new_x = x + (intra_out if intra_out is not None else inter_out)
        y = self.norm1(new_x)
        height, width = grid if grid is not None else (0, 0)
        if isinstance(self.ffn, ConvFeedForward) and grid is None:
            msg = "ffn='dwconv_median' needs the token grid."
            raise ValueError(msg)
        return self.norm2(y + self.ffn(y, height, width)), intra, inter


class TokenEmbedding(nn.Module):
    """Per-token linear projection ``C -> D`` (the paper's 1x1 conv, Kaiming fan-in init)."""

    def __init__(self, in_channels: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, d_model)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` -> ``(B, L, D)``."""
        return self.proj(x)


class FodTransformer(DynamicBufferMixin, nn.Module):
    """The per-level FOD Transformer: embed, ``num_layers`` I2Correlation layers, reconstruct.

    Reference features live here as buffers (``ref_features (S, C)``, ``ref_positions (S, 2)``,
    ``ref_grid (2,)``) so they are saved in checkpoints, moved by ``.to()`` and become
    constants of an exported graph. They are empty until the reference callback fills them;
    ``DynamicBufferMixin`` lets a checkpoint restore them into a freshly built model.

    Args:
        in_channels: channels ``C`` of the backbone features of this level.
        d_model: Transformer width ``D`` (multiple of 4 and of ``num_heads``).
        settings: reads ``num_layers``, ``with_intra``, ``with_inter``, ``reference`` (``"mean"``:
            one reference per grid position, enabling the factorised target; ``"coreset"``:
            references at arbitrary positions), ``relative_position_bias`` and what
            :class:`I2CorrelationLayer` reads.
    """

    def __init__(self, in_channels: int, d_model: int, settings: FodSettings | None = None) -> None:
        super().__init__()
        settings = settings or FodSettings()
        if d_model % 4:
            msg = f"d_model must be a multiple of 4 for the 2D sin-cos embedding, got {d_model}."
            raise ValueError(msg)
        self.d_model = d_model
        self.with_intra = settings.with_intra
        self.with_inter = settings.with_inter
        self.reference = settings.reference
        self.relative_position_bias = settings.relative_position_bias
        self.embedding = TokenEmbedding(in_channels, d_model)
        self.ref_embedding = TokenEmbedding(in_channels, d_model) if settings.with_inter else None
        self.layers = nn.ModuleList(I2CorrelationLayer(d_model, settings) for _ in range(settings.num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, in_channels)
        self.register_buffer("ref_features", torch.empty(0, in_channels))
        self.register_buffer("ref_positions", torch.empty(0, 2))
        self.register_buffer("ref_grid", torch.zeros(2, dtype=torch.long))

    @property
    def has_reference(self) -> bool:
        """Whether reference features have been computed (or loaded)."""
        return self.ref_features.shape[0] > 0

    def set_reference(self, features: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> None:
        """Store reference tokens ``(S, C)`` at (row, column) ``positions`` ``(S, 2)`` of a ``grid``."""
        self.ref_features = features.detach().to(self.head.weight)
        self.ref_positions = positions.detach().to(self.head.weight)
        self.ref_grid = torch.tensor(grid, dtype=torch.long, device=self.head.weight.device)

    def _check_reference(self, height: int, width: int, channels: int) -> None:
        if not self.has_reference:
            msg = (
                "FOD's reference features are missing: they are computed from the training set when "
                "training starts (ReferenceFeatureCallback). Train the model first, or load a checkpoint "
                "of a trained model."
            )
            raise RuntimeError(msg)
        if self.ref_features.shape[-1] != channels:
            msg = f"reference features have {self.ref_features.shape[-1]} channels, the backbone gives {channels}."
            raise RuntimeError(msg)
        if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return  # values are constants of the exported graph; checked before export
        grid = tuple(int(v) for v in self.ref_grid.tolist())
        if grid != (height, width):
            msg = (
                f"reference features were computed on a {grid[0]}x{grid[1]} token grid, this input gives "
                f"{height}x{width}: use the image size the model was trained with."
            )
            raise RuntimeError(msg)

    def forward(
        self,
        tokens: torch.Tensor,
        height: int,
        width: int,
        need_intra: bool = True,
        need_inter: bool = True,
        keep_maps: bool = False,
    ) -> LevelOutput:
        """Reconstruct ``(B, L, C)`` tokens of a ``height x width`` grid and collect correlations.

        ``need_intra`` / ``need_inter`` say which branch statistics the caller uses; the targets
        of the others are not computed (their attentions still run: they shape the features).
        """
        coords = grid_coordinates(height, width, tokens.device)
        x = self.embedding(tokens) + sincos_embedding(coords, self.d_model).to(tokens.dtype)
        intra_geometry = grid_geometry(coords, height, width) if (self.with_intra and need_intra) else None
        reference = inter_geometry = None
        if self.with_inter:
            self._check_reference(height, width, tokens.shape[-1])
            ref_pos = self.ref_positions.float()
            reference = self.ref_embedding(self.ref_features.to(tokens.dtype)) + sincos_embedding(
                ref_pos,
                self.d_model,
            ).to(tokens.dtype)
            reference = reference.unsqueeze(0)
            if need_inter:
                if self.reference == "mean":  # one reference per grid cell, row-major
                    inter_geometry = grid_geometry(coords, height, width)
                else:
                    inter_geometry = KeyGeometry(*squared_distances(coords, ref_pos), separable=False)
        intra_offsets = inter_offsets = None
        if self.relative_position_bias:
            intra_offsets = relative_offsets(coords, coords, height, width)
            if self.with_inter:
                inter_offsets = relative_offsets(coords, self.ref_positions.float(), height, width)
        output = LevelOutput(reconstruction=tokens)
        for layer in self.layers:
            x, intra, inter = layer(
                x,
                reference,
                intra_geometry,
                inter_geometry,
                keep_maps,
                (height, width),
                intra_offsets,
                inter_offsets,
            )
            if intra is not None:
                output.intra.append(intra)
            if inter is not None:
                output.inter.append(inter)
        output.reconstruction = self.head(self.norm(x))
        return output
