"""FOD's correlation attention computed in blocks of query rows, never as full ``(B, H, L, S)`` maps.

An attention of FOD's correlation game needs its output *and* per-token statistics of its
attention map against a Gaussian target (symmetric KL, entropy; :mod:`.correlation`). Written
plainly, every attention materialises ``(B, H, L, S)`` maps (32 MiB per image for the stride-8
level at 256 px) and walks them a dozen times, forwards and backwards: the step is bound by
memory traffic, not arithmetic, and autograd keeps four such maps per attention for the backward.

Here a block of query rows at a time computes logits, softmax, output, target and statistics,
then drops them: the block stays in the CPU's cache (or is one modest CUDA buffer). The backward
recomputes each block from ``q``, ``k``, the rows' log-sum-exp and the target's scales, the way
flash attention does, so nothing of size ``L x S`` is kept between forward and backward.

Everything here is float32 inside (the logarithms of near-zero probabilities need it); the
matmuls run in the dtype of ``q``/``k``/``v`` (bf16 under autocast). :func:`tests
<tests.test_blocked_attention>` check values and gradients against the plain computation.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    if geometry.separable:
        rows = torch.softmax(geometry.rows * -inv[..., 0:1], dim=-1)  # (B, H, Lb, h)
        cols = torch.softmax(geometry.cols * -inv[..., 1:2], dim=-1)  # (B, H, Lb, w)
        return (rows.unsqueeze(-1) * cols.unsqueeze(-2)).flatten(-2), (rows, cols)
    target = torch.softmax(geometry.rows * -inv[..., 0:1] - geometry.cols * inv[..., 1:2], dim=-1)
    return target, ()


def target_block_backward(
    grad: torch.Tensor,
    target: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    geometry: KeyGeometry,
) -> torch.Tensor:
    """Gradient ``(B, H, Lb, 2)`` w.r.t. ``inv`` of :func:`target_block`, given ``(B, H, Lb, S)`` ``grad``."""
    if geometry.separable:
        rows, cols = parts
        grid = grad.unflatten(-1, (rows.shape[-1], cols.shape[-1]))  # (B, H, Lb, h, w)
        grad_rows = torch.linalg.vecdot(grid, cols.unsqueeze(-2))  # sum over columns, (B, H, Lb, h)
        grad_cols = (grid * rows.unsqueeze(-1)).sum(-2)  # sum over rows, (B, H, Lb, w)
        grad_rows = rows * (grad_rows - (grad_rows * rows).sum(-1, keepdim=True))  # softmax backward
        grad_cols = cols * (grad_cols - (grad_cols * cols).sum(-1, keepdim=True))
        return torch.stack(
            ((grad_rows * geometry.rows).sum(-1).neg(), (grad_cols * geometry.cols).sum(-1).neg()),
            dim=-1,
        )
    grad_logits = target * (grad - (grad * target).sum(-1, keepdim=True))
    return torch.stack(
        ((grad_logits * geometry.rows).sum(-1).neg(), (grad_logits * geometry.cols).sum(-1).neg()),
        dim=-1,
    )


def _per_token(values: torch.Tensor) -> torch.Tensor:
    """``(B, H, Lb, S)`` x ``(B, H, Lb, S)`` row sums already taken: ``(B, H, Lb)`` -> ``(B, Lb)`` head mean."""
    return values.mean(dim=1)


def _accumulate(total: torch.Tensor, contribution: torch.Tensor) -> None:
    """Add a block's ``(B, H, S, d)`` key/value gradient, summed over the batch for broadcast keys."""
    if total.shape[0] == 1 and contribution.shape[0] != 1:
        contribution = contribution.sum(0, keepdim=True)
    total += contribution.float()


@dataclass
class _Block:
    """One block of query rows, recomputed identically in the forward and the backward."""

    attention: torch.Tensor  # (B, H, Lb, S) float32
    target: torch.Tensor  # (B, H, Lb, S) float32
    target_parts: tuple[torch.Tensor, ...]
    attention_eps: torch.Tensor  # a + eps
    log_attention: torch.Tensor  # log(a + eps)
    target_eps: torch.Tensor  # t + eps
    log_ratio: torch.Tensor  # log(a + eps) - log(t + eps)


def _compute_block(
    query_b: torch.Tensor,
    key_t: torch.Tensor,
    inv_b: torch.Tensor,
    geometry_b: KeyGeometry,
    eps: float,
) -> _Block:
    """Attention, target and their logarithms for queries ``query_b`` ``(B, H, Lb, d)``."""
    attention = torch.softmax((query_b @ key_t).float(), dim=-1)
    target, parts = target_block(inv_b, geometry_b)
    attention_eps = attention + eps
    log_attention = torch.log(attention_eps)
    target_eps = target + eps
    log_ratio = torch.log(target_eps).neg_().add_(log_attention)
    return _Block(attention, target, parts, attention_eps, log_attention, target_eps, log_ratio)


def _block_statistics(block: _Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(B, Lb)`` symmetric KL ``sum (a - t)(la - lt)`` and entropy ``-sum a la``, head means."""
    divergence = torch.linalg.vecdot(block.attention - block.target, block.log_ratio)
    entropy = torch.linalg.vecdot(block.attention, block.log_attention).neg_()
    return _per_token(divergence), _per_token(entropy)


def correlation_attention_inference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    inv: torch.Tensor,
    geometry: KeyGeometry,
    eps: float = LOG_EPS,
    block: int | None = None,
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
    outputs, divergences, entropies = [], [], []
    for start in range(0, length, block):
        stop = min(length, start + block)
        current = _compute_block(query[:, :, start:stop], key_t, inv[:, :, start:stop], geometry.block(start, stop), eps)
        outputs.append(current.attention.to(value.dtype) @ value)
        divergence, entropy = _block_statistics(current)
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
    def forward(ctx, query, key, value, inv, geometry, eps, block):  # noqa: ANN001, ANN205, PLR0913
        batch, heads, length, _ = query.shape
        ctx.set_materialize_grads(False)
        key_t = key.transpose(-2, -1)
        out = query.new_empty(batch, heads, length, value.shape[-1], dtype=torch.result_type(query, value))
        kl = torch.empty(batch, length, device=query.device, dtype=torch.float32)
        entropy = torch.empty_like(kl)
        for start in range(0, length, block):
            stop = min(length, start + block)
            current = _compute_block(query[:, :, start:stop], key_t, inv[:, :, start:stop], geometry.block(start, stop), eps)
            out[:, :, start:stop] = current.attention.to(value.dtype) @ value
            kl[:, start:stop], entropy[:, start:stop] = _block_statistics(current)
        ctx.save_for_backward(query, key, value, inv)
        ctx.geometry = geometry
        ctx.eps = eps
        ctx.block = block
        return out, kl, kl.clone(), entropy

    @staticmethod
    def backward(ctx, grad_out, grad_kl_attention, grad_kl_target, grad_entropy):  # noqa: ANN001, ANN205
        query, key, value, inv = ctx.saved_tensors
        geometry, eps, block = ctx.geometry, ctx.eps, ctx.block
        heads, length = query.shape[1], query.shape[2]
        need_q, need_k, need_v, need_inv = ctx.needs_input_grad[:4]
        key_t = key.transpose(-2, -1)
        grad_q = torch.zeros_like(query) if need_q else None
        grad_k = torch.zeros(key.shape, device=key.device, dtype=torch.float32) if need_k else None
        grad_v = torch.zeros(value.shape, device=value.device, dtype=torch.float32) if need_v else None
        grad_inv = torch.zeros_like(inv) if need_inv else None

        def per_row(grad: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
            return None if grad is None else (grad[:, start:stop].float() / heads)[:, None, :, None]

        for start in range(0, length, block):
            stop = min(length, start + block)
            block_geometry = geometry.block(start, stop)
            query_b = query[:, :, start:stop]
            grad_out_b = None if grad_out is None else grad_out[:, :, start:stop].to(value.dtype)
            current = _compute_block(query_b, key_t, inv[:, :, start:stop], block_geometry, eps)
            attention = current.attention
            g_kla = per_row(grad_kl_attention, start, stop)
            g_ent = per_row(grad_entropy, start, stop)
            if need_q or need_k:
                grad_logits = _attention_grad(current, grad_out_b, value, g_kla, g_ent).to(query.dtype)
                if need_q:
                    grad_q[:, :, start:stop] = grad_logits @ key
                if need_k:
                    _accumulate(grad_k, grad_logits.transpose(-2, -1) @ query_b)
            if need_v and grad_out_b is not None:
                _accumulate(grad_v, attention.to(value.dtype).transpose(-2, -1) @ grad_out_b)
            g_klt = per_row(grad_kl_target, start, stop)
            if need_inv and g_klt is not None:
                grad_t = torch.sub(current.target, attention).div_(current.target_eps).sub_(current.log_ratio).mul_(g_klt)
                grad_inv[:, :, start:stop] = target_block_backward(grad_t, current.target, current.target_parts, block_geometry)
        grad_k = grad_k.to(key.dtype) if grad_k is not None else None
        grad_v = grad_v.to(value.dtype) if grad_v is not None else None
        return grad_q, grad_k, grad_v, grad_inv, None, None, None


def _attention_grad(
    block: _Block,
    grad_out: torch.Tensor | None,
    value: torch.Tensor,
    g_kla: torch.Tensor | None,
    g_ent: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient ``(B, H, Lb, S)`` w.r.t. a block's logits, from the output and the statistics."""
    attention = block.attention
    grad = (grad_out @ value.transpose(-2, -1)).float() if grad_out is not None else torch.zeros_like(attention)
    if g_kla is not None or g_ent is not None:
        g_kla = g_kla if g_kla is not None else attention.new_zeros(())
        g_ent = g_ent if g_ent is not None else attention.new_zeros(())
        grad.addcmul_(block.log_ratio, g_kla).addcmul_(block.log_attention, g_ent, value=-1.0)
        ratio = (attention * (g_kla - g_ent)).addcmul_(block.target, g_kla, value=-1.0).div_(block.attention_eps)
        grad += ratio
    return grad.sub_(torch.linalg.vecdot(grad, attention).unsqueeze(-1)).mul_(attention)  # softmax backward


def correlation_attention_training(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    inv: torch.Tensor,
    geometry: KeyGeometry,
    eps: float = LOG_EPS,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, ``kl_attention``, ``kl_target`` and entropy of an attention, differentiable, in blocks.

    Arguments as :func:`correlation_attention_inference`. Returns ``(B, H, L, d)`` and three ``(B, L)``
    tensors: the symmetric KL whose gradient reaches only the attention (``q``, ``k``), the same
    value whose gradient reaches only the target (``inv``), and the entropy of the attention.
    """
    batch, heads, length, _ = query.shape
    block = block or block_rows(batch, heads, length, key.shape[-2], query.device)
    return _BlockedCorrelationAttention.apply(query, key, value, inv, geometry, eps, block)
