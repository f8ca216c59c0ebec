"""FOD's correlation attention computed in blocks of query rows, never as full ``(B, H, L, S)`` maps.

An attention of FOD's correlation game needs its output *and* per-token statistics of its
attention map against a Gaussian target (symmetric KL, entropy; :mod:`.correlation`). Written
plainly, every attention materialises ``(B, H, L, S)`` maps (32 MiB per image for the stride-8
level at 256 px) and walks them a dozen times, forwards and backwards: the step is bound by
memory traffic, not arithmetic, and autograd keeps four such maps per attention for the backward.

Here a block of query rows at a time computes logits, softmax, output, target and statistics,
then drops them: the block stays in the CPU's cache (or is one modest CUDA buffer). The backward
recomputes each block from ``q``, ``k`` and the target's scales, the way
flash attention does, so nothing of size ``L x S`` is kept between forward and backward.

Per block, the element-wise work (softmax, logarithms, row sums, their gradients) is one function
for the forward and one for the backward (:func:`forward_block`, :func:`backward_block`), which
``torch.compile`` fuses into a few loops for large maps (:class:`_Kernels`); the eager functions
are the fallback and give the same values within float32 rounding.

Everything here is float32 inside (the logarithms of near-zero probabilities need it); the
matmuls run in the dtype of ``q``/``k``/``v`` (bf16 under autocast). :func:`tests
<tests.test_blocked_attention>` check values and gradients against the plain computation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .correlation import LOG_EPS, KeyGeometry

# Elements of one block's (B, H, rows, S) logits. 2^18 floats = 1 MiB: the handful of block-sized
# temporaries stay in a CPU's L2/L3 cache. Fewer than 32 rows per block make the per-head matmuls
# too thin to run at speed (measured: 8-row blocks cost 1.4x 32-row ones at batch 4), so small
# blocks are widened to 32 rows. A CUDA device has bandwidth to spare and pays per kernel launch
# instead, so it takes far larger blocks.
CPU_BLOCK_ELEMENTS = 1 << 18
CUDA_BLOCK_ELEMENTS = 1 << 26
MIN_BLOCK_ROWS = 32


def block_rows(batch: int, heads: int, length: int, keys: int, device: torch.device, elements: int | None = None) -> int:
    """Query rows per block: one block's ``(batch, heads, rows, keys)`` logits hold ~``elements``, rows >= 32."""
    if elements is None:
        elements = CUDA_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS
    return max(1, min(length, max(MIN_BLOCK_ROWS, elements // max(1, batch * heads * keys))))


def target_block(inv: torch.Tensor, geometry: KeyGeometry) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Row-normalised Gaussian target ``(B, H, Lb, S)`` of a block, and what its backward needs.

    Args:
        inv: ``(B, H, Lb, 2)`` float32 ``1 / (2 sigma^2)`` per query and axis (y, x).
        geometry: the block's distances.
    """
    return _target(inv, geometry.rows, geometry.cols, geometry.separable)


def _target(
    inv: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, separable: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`target_block` on the geometry's tensors (what a compiled kernel takes)."""
    if separable:
        row_part = torch.softmax(rows * -inv[..., 0:1], dim=-1)  # (B, H, Lb, h)
        col_part = torch.softmax(cols * -inv[..., 1:2], dim=-1)  # (B, H, Lb, w)
        return (row_part.unsqueeze(-1) * col_part.unsqueeze(-2)).flatten(-2), (row_part, col_part)
    target = torch.softmax(rows * -inv[..., 0:1] - cols * inv[..., 1:2], dim=-1)
    return target, ()


def _target_backward(
    grad: torch.Tensor,
    target: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    rows: torch.Tensor,
    cols: torch.Tensor,
    separable: bool,
) -> torch.Tensor:
    """Gradient ``(B, H, Lb, 2)`` w.r.t. ``inv`` of :func:`_target`, given ``(B, H, Lb, S)`` ``grad``."""
    if separable:
        row_part, col_part = parts
        grid = grad.unflatten(-1, (row_part.shape[-1], col_part.shape[-1]))  # (B, H, Lb, h, w)
        grad_rows = torch.linalg.vecdot(grid, col_part.unsqueeze(-2))  # sum over columns, (B, H, Lb, h)
        grad_cols = (grid * row_part.unsqueeze(-1)).sum(-2)  # sum over rows, (B, H, Lb, w)
        grad_rows = row_part * (grad_rows - (grad_rows * row_part).sum(-1, keepdim=True))  # softmax backward
        grad_cols = col_part * (grad_cols - (grad_cols * col_part).sum(-1, keepdim=True))
        return torch.stack(((grad_rows * rows).sum(-1).neg(), (grad_cols * cols).sum(-1).neg()), dim=-1)
    grad_logits = target * (grad - (grad * target).sum(-1, keepdim=True))
    return torch.stack(((grad_logits * rows).sum(-1).neg(), (grad_logits * cols).sum(-1).neg()), dim=-1)


def _accumulate(total: torch.Tensor, contribution: torch.Tensor) -> None:
    """Add a block's ``(B, H, S, d)`` key/value gradient, summed over the batch for broadcast keys."""
    if total.shape[0] == 1 and contribution.shape[0] != 1:
        contribution = contribution.sum(0, keepdim=True)
    total += contribution.float()


def _block_maps(
    logits: torch.Tensor, inv: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, separable: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Attention, target (and its parts), ``log(a + eps)`` and ``log(a + eps) - log(t + eps)`` of a block."""
    attention = torch.softmax(logits.float(), dim=-1)
    target, parts = _target(inv, rows, cols, separable)
    log_attention = torch.log(attention + eps)
    log_ratio = log_attention - torch.log(target + eps)
    return attention, target, parts, log_attention, log_ratio


def forward_block(
    logits: torch.Tensor, inv: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, separable: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's ``(B, H, Lb, S)`` attention and per-token ``(B, Lb)`` symmetric KL and entropy (head means).

    Args:
        logits: ``(B, H, Lb, S)`` attention logits of the block's queries.
        inv: ``(B, H, Lb, 2)`` float32 ``1 / (2 sigma^2)`` of the block's queries.
        rows, cols, separable: the block's :class:`KeyGeometry`.
        eps: added inside the logarithms.
    """
    attention, target, _, log_attention, log_ratio = _block_maps(logits, inv, rows, cols, separable, eps)
    divergence = torch.linalg.vecdot(attention - target, log_ratio)  # sum (a - t)(la - lt)
    entropy = torch.linalg.vecdot(attention, log_attention).neg_()
    return attention, divergence.mean(dim=1), entropy.mean(dim=1)


def backward_block(  # noqa: PLR0913
    logits: torch.Tensor,
    inv: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    separable: bool,
    eps: float,
    grad_values: torch.Tensor | None,
    g_kla: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    g_klt: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Recompute a block and return its attention, the logits' gradient and the target scales' gradient.

    Args:
        logits, inv, rows, cols, separable, eps: as :func:`forward_block`.
        grad_values: ``(B, H, Lb, S)`` ``dO v^T``, the output's gradient w.r.t. the attention, or ``None``.
        g_kla, g_ent, g_klt: ``(B, 1, Lb, 1)`` per-token gradients of ``kl_attention``, the entropy and
            ``kl_target``, already divided by the number of heads, or ``None``.

    Returns:
        ``(B, H, Lb, S)`` attention, ``(B, H, Lb, S)`` gradient w.r.t. the logits, ``(B, H, Lb, 2)``
        gradient w.r.t. ``inv`` (``None`` without ``g_klt``).
    """
    attention, target, parts, log_attention, log_ratio = _block_maps(logits, inv, rows, cols, separable, eps)
    grad = grad_values.float() if grad_values is not None else torch.zeros_like(attention)
    if g_kla is not None or g_ent is not None:
        g_kla = g_kla if g_kla is not None else attention.new_zeros(())
        g_ent = g_ent if g_ent is not None else attention.new_zeros(())
        grad = grad + log_ratio * g_kla - log_attention * g_ent
        grad = grad + (attention * (g_kla - g_ent) - target * g_kla) / (attention + eps)
    grad_logits = (grad - torch.linalg.vecdot(grad, attention).unsqueeze(-1)) * attention  # softmax backward
    grad_inv = None
    if g_klt is not None:
        grad_target = ((target - attention) / (target + eps) - log_ratio) * g_klt
        grad_inv = _target_backward(grad_target, target, parts, rows, cols, separable)
    return attention, grad_logits, grad_inv


class _Kernels:
    """:func:`forward_block` and :func:`backward_block`, eager or compiled with ``torch.compile``.

    Run eagerly, each block walks its ``(B, H, Lb, S)`` maps a dozen times forwards and twice as often
    backwards: the training step is bound by that traffic. Compiled, inductor fuses the softmax, the
    logarithms and the row sums into a few loops (C++/OpenMP on a CPU, Triton on a GPU). Compiling
    takes seconds per shape, so small maps (tests, tiny models) stay eager; when compiling fails (no
    C++ compiler, no Triton) this warns once and falls back to the eager functions, which give the
    same values within float32 rounding. One instance per process: compiled code is cached per shape.
    """

    # Elements of one image's (H, L, S) maps below which compiling does not pay: at 256 px FOD's maps
    # hold 2^23 (stride 8) and 2^19 (stride 16), at 128 px 2^19 and 2^15, a 64 px test model's 2^15.
    MIN_ELEMENTS = 1 << 18

    def __init__(self) -> None:
        self._compiled: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        self._failed = False

    def pick(self, compiled: bool, heads: int, length: int, keys: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(forward, backward)`` kernels for an attention of this size."""
        if not compiled or self._failed or heads * length * keys < self.MIN_ELEMENTS:
            return forward_block, backward_block
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return forward_block, backward_block
        if self._compiled is None:
            self._compiled = (
                self._guarded(torch.compile(forward_block, dynamic=False), forward_block),
                self._guarded(torch.compile(backward_block, dynamic=False), backward_block),
            )
        return self._compiled

    def _guarded(self, kernel: Callable[..., Any], fallback: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:  # noqa: ANN401
            if self._failed:
                return fallback(*args)
            try:
                return kernel(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure: the eager kernel is exact
                self._failed = True
                warnings.warn(
                    f"torch.compile could not build FOD's fused attention kernels ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); training continues with the eager "
                    "kernels (same results, slower). Set compile_kernels=False to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return fallback(*args)

        return call


_KERNELS = _Kernels()


def correlation_attention_inference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    inv: torch.Tensor,
    geometry: KeyGeometry,
    eps: float = LOG_EPS,
    block: int | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output, per-token symmetric KL to the target and entropy, without autograd.

    Args:
        query: ``(B, H, L, d)``, already multiplied by the logit scale.
        key: ``(B, H, S, d)`` or ``(1, H, S, d)`` (broadcast over the batch).
        value: like ``key``.
        inv: ``(B, H, L, 2)`` float32 ``1 / (2 sigma^2)`` of every query's target.
        geometry: distances of all ``L`` queries to the ``S`` keys.
        eps: added inside the logarithms (see :data:`.correlation.LOG_EPS`).
        block: query rows per block (default: :func:`block_rows`).
        compiled: use the ``torch.compile`` kernels where the maps are large (see :class:`_Kernels`).

    Returns:
        ``(B, H, L, d)`` output, ``(B, L)`` symmetric KL and ``(B, L)`` entropy, averaged over heads.
    """
    batch, heads, length, _ = query.shape
    key_t = key.transpose(-2, -1)
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        # One block per attention in an exported graph: unrolled into dozens of blocks it took minutes
        # to export (10 min for 64-row blocks at 256 px) for 0-18 % less OpenVINO latency, measured.
        block = length
    block = block or block_rows(batch, heads, length, key.shape[-2], query.device)
    forward, _ = _KERNELS.pick(compiled, heads, length, key.shape[-2])
    outputs, divergences, entropies = [], [], []
    for start in range(0, length, block):
        stop = min(length, start + block)
        part = geometry.block(start, stop)
        attention, divergence, entropy = forward(
            query[:, :, start:stop] @ key_t, inv[:, :, start:stop], part.rows, part.cols, part.separable, eps
        )
        outputs.append(attention.to(value.dtype) @ value)
        divergences.append(divergence)
        entropies.append(entropy)
    return torch.cat(outputs, dim=2), torch.cat(divergences, dim=1), torch.cat(entropies, dim=1)


class _BlockedCorrelationAttention(torch.autograd.Function):
    """Attention output, symmetric KL (two detach variants) and entropy, in query blocks.

    Outputs, for ``n`` heads, ``a`` the attention, ``t`` the target, ``la = log(a + eps)``,
    ``lt = log(t + eps)``: ``out = a v``; ``kl = mean_heads sum_s (a - t)(la - lt)`` twice (the
    first's gradient reaches only the attention, the second's only the target: FOD's minimax
    routing); ``entropy = -mean_heads sum_s a la``. Nothing of size ``L x S`` is saved: the backward
    recomputes each block (the softmax of the same logits gives the same attention). Per block,
    with ``g*`` the incoming per-token gradients divided by ``n``:

    - ``dL/da = dO v^T + g_kla (la - lt) - g_ent la + ((g_kla - g_ent) a - g_kla t) / (a + eps)``,
      then the softmax backward to the logits, and the matmul backwards to ``q``, ``k``, ``v``;
    - ``dL/dt = g_klt ((t - a) / (t + eps) - (la - lt))``, then the target's softmax backward to ``inv``.
    """

    @staticmethod
    def forward(ctx, query, key, value, inv, geometry, eps, block, compiled):  # noqa: ANN001, ANN205, PLR0913
        batch, heads, length, _ = query.shape
        ctx.set_materialize_grads(False)
        key_t = key.transpose(-2, -1)
        forward, _ = _KERNELS.pick(compiled, heads, length, key.shape[-2])
        out = query.new_empty(batch, heads, length, value.shape[-1], dtype=torch.result_type(query, value))
        kl = torch.empty(batch, length, device=query.device, dtype=torch.float32)
        entropy = torch.empty_like(kl)
        for start in range(0, length, block):
            stop = min(length, start + block)
            part = geometry.block(start, stop)
            attention, kl[:, start:stop], entropy[:, start:stop] = forward(
                query[:, :, start:stop] @ key_t, inv[:, :, start:stop], part.rows, part.cols, part.separable, eps
            )
            out[:, :, start:stop] = attention.to(value.dtype) @ value
        ctx.save_for_backward(query, key, value, inv)
        ctx.geometry = geometry
        ctx.eps = eps
        ctx.block = block
        ctx.compiled = compiled
        return out, kl, kl.clone(), entropy

    @staticmethod
    def backward(ctx, grad_out, grad_kl_attention, grad_kl_target, grad_entropy):  # noqa: ANN001, ANN205
        query, key, value, inv = ctx.saved_tensors
        geometry, eps, block = ctx.geometry, ctx.eps, ctx.block
        heads, length = query.shape[1], query.shape[2]
        need_q, need_k, need_v, need_inv = ctx.needs_input_grad[:4]
        _, backward = _KERNELS.pick(ctx.compiled, heads, length, key.shape[-2])
        key_t = key.transpose(-2, -1)
        value_t = value.transpose(-2, -1)
        grad_q = torch.zeros_like(query) if need_q else None
        grad_k = torch.zeros(key.shape, device=key.device, dtype=torch.float32) if need_k else None
        grad_v = torch.zeros(value.shape, device=value.device, dtype=torch.float32) if need_v else None
        grad_inv = torch.zeros_like(inv) if need_inv else None

        def per_row(grad: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
            return None if grad is None else (grad[:, start:stop].float() / heads)[:, None, :, None]

        for start in range(0, length, block):
            stop = min(length, start + block)
            part = geometry.block(start, stop)
            query_b = query[:, :, start:stop]
            grad_out_b = None if grad_out is None else grad_out[:, :, start:stop].to(value.dtype)
            attention, grad_logits, grad_inv_b = backward(
                query_b @ key_t,
                inv[:, :, start:stop],
                part.rows,
                part.cols,
                part.separable,
                eps,
                None if grad_out_b is None else grad_out_b @ value_t,
                per_row(grad_kl_attention, start, stop),
                per_row(grad_entropy, start, stop),
                per_row(grad_kl_target, start, stop) if need_inv else None,
            )
            grad_logits = grad_logits.to(query.dtype)
            if need_q:
                grad_q[:, :, start:stop] = grad_logits @ key
            if need_k:
                _accumulate(grad_k, grad_logits.transpose(-2, -1) @ query_b)
            if need_v and grad_out_b is not None:
                _accumulate(grad_v, attention.to(value.dtype).transpose(-2, -1) @ grad_out_b)
            if grad_inv_b is not None:
                grad_inv[:, :, start:stop] = grad_inv_b
        grad_k = grad_k.to(key.dtype) if grad_k is not None else None
        grad_v = grad_v.to(value.dtype) if grad_v is not None else None
        return grad_q, grad_k, grad_v, grad_inv, None, None, None, None


def correlation_attention_training(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    inv: torch.Tensor,
    geometry: KeyGeometry,
    eps: float = LOG_EPS,
    block: int | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, ``kl_attention``, ``kl_target`` and entropy of an attention, differentiable, in blocks.

    Arguments as :func:`correlation_attention_inference`. Returns ``(B, H, L, d)`` and three ``(B, L)``
    tensors: the symmetric KL whose gradient reaches only the attention (``q``, ``k``), the same
    value whose gradient reaches only the target (``inv``), and the entropy of the attention.
    """
    batch, heads, length, _ = query.shape
    block = block or block_rows(batch, heads, length, key.shape[-2], query.device)
    return _BlockedCorrelationAttention.apply(query, key, value, inv, geometry, eps, block, compiled)
