"""The blocked correlation attention equals the plain computation over full maps.

The plain path (full ``(B, H, L, S)`` attention and target maps, :func:`branch_stats` with its own
fused statistics, autograd through everything else) is the reference: values, the minimax
gradient routing of both KL outputs, and the gradients of every input must agree within float32
rounding, for any block size (including blocks that do not divide the rows), broadcast keys,
the factorised and the general target, and through the layer and the whole level.
"""

from __future__ import annotations

import pytest
import torch

from anomalib_fod.models.fod import blocked_attention
from anomalib_fod.models.fod.blocked_attention import (
    block_rows,
    correlation_attention_inference,
    correlation_attention_training,
)
from anomalib_fod.models.fod.correlation import KeyGeometry, correlation_stats, sigma_from_logits
from anomalib_fod.models.fod.settings import FodSettings
from anomalib_fod.models.fod.transformer import (
    CorrelationAttention,
    FodTransformer,
    grid_coordinates,
    grid_geometry,
    squared_distances,
)

HEIGHT, WIDTH = 5, 6


def geometry(separable: bool) -> KeyGeometry:
    coords = grid_coordinates(HEIGHT, WIDTH)
    if separable:
        return grid_geometry(coords, HEIGHT, WIDTH)
    return KeyGeometry(*squared_distances(coords, coords), separable=False)


def plain(query, key, value, sigma_logits, geo):  # noqa: ANN001, ANN201
    attention = torch.softmax(query @ key.transpose(-2, -1), dim=-1)
    target = geo.target(sigma_from_logits(sigma_logits))
    return (attention @ value, *correlation_stats(attention, target))


def blocked(query, key, value, sigma_logits, geo, block):  # noqa: ANN001, ANN201
    inv = 0.5 / sigma_from_logits(sigma_logits).square()
    return correlation_attention_training(query, key, value, inv, geo, block=block)


def inputs(key_batch: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch, heads, length, dim = 2, 3, HEIGHT * WIDTH, 8
    shapes = [(batch, heads, length, dim), (key_batch, heads, length, dim), (key_batch, heads, length, dim)]
    tensors = [torch.randn(*shape, generator=generator) for shape in shapes]
    tensors.append(torch.randn(batch, heads, length, 2, generator=generator))
    return [t.requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("separable", [True, False])
@pytest.mark.parametrize("key_batch", [2, 1])
@pytest.mark.parametrize("block", [1, 7, 30, 64])
def test_values_and_gradients_match_the_plain_path(separable: bool, key_batch: int, block: int) -> None:
    geo = geometry(separable)
    tensors = inputs(key_batch)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in
               enumerate(plain(*[t.detach() for t in tensors], geo))]

    def run(function) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # noqa: ANN001
        for tensor in tensors:
            tensor.grad = None
        outputs = function(*tensors)
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        return [o.detach() for o in outputs], [t.grad.clone() for t in tensors]

    want_values, want_grads = run(lambda *t: plain(*t, geo))
    got_values, got_grads = run(lambda *t: blocked(*t, geo, block))
    for got, want in zip(got_values, want_values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_each_kl_output_routes_its_gradient_to_one_side() -> None:
    """``kl_attention`` moves only q and k; ``kl_target`` moves only the sigmas (FOD's minimax)."""
    geo = geometry(True)
    query, key, value, sigma_logits = inputs(2)
    _, kl_attention, kl_target, _ = blocked(query, key, value, sigma_logits, geo, block=4)
    grads = torch.autograd.grad(
        kl_attention.sum(), (query, key, value, sigma_logits), allow_unused=True, retain_graph=True
    )
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None or grads[2].abs().sum() == 0
    assert grads[3] is None or grads[3].abs().sum() == 0
    grads = torch.autograd.grad(kl_target.sum(), (query, key, sigma_logits), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads[:2])
    assert grads[2].abs().sum() > 0


@pytest.mark.parametrize("separable", [True, False])
def test_inference_matches_the_plain_path(separable: bool) -> None:
    geo = geometry(separable)
    with torch.no_grad():
        query, key, value, sigma_logits = (t.detach() for t in inputs(1))
        want = plain(query, key, value, sigma_logits, geo)
        inv = 0.5 / sigma_from_logits(sigma_logits).square()
        for block in (1, 8, 100):
            out, kl, entropy = correlation_attention_inference(query, key, value, inv, geo, block=block)
            torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(kl, want[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(entropy, want[3], rtol=1e-5, atol=1e-6)


def test_block_rows_bounds_the_block_size() -> None:
    cpu = torch.device("cpu")
    assert block_rows(1, 8, 1024, 1024, cpu, elements=1 << 20) == 128
    assert block_rows(64, 8, 1024, 1024, cpu, elements=1 << 18) == 32  # never thinner than 32 rows
    assert block_rows(1, 1, 10, 10, cpu, elements=1 << 20) == 10  # never more rows than exist


@pytest.mark.parametrize("training", [True, False])
def test_attention_module_fast_path_matches_its_plain_path(training: bool) -> None:
    """The module's blocked / fused path and the map-keeping path give the same output and statistics."""
    torch.manual_seed(0)
    attention = CorrelationAttention(16, FodSettings(num_heads=4)).train(training)
    x = torch.randn(2, HEIGHT * WIDTH, 16, requires_grad=True)
    reference = torch.randn(1, HEIGHT * WIDTH, 16)
    geo = geometry(True)
    with torch.set_grad_enabled(training):
        fast_out, fast = attention(x, reference, geo)
        plain_out, slow = attention(x, reference, geo, keep_maps=True)
    assert fast.maps is None and slow.maps is not None
    torch.testing.assert_close(fast_out, plain_out, rtol=1e-5, atol=1e-6)
    for name in ("kl_attention", "kl_target", "entropy"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-6)
    without_stats, none = attention(x, reference)  # no target wanted: fused attention, no statistics
    assert none is None
    torch.testing.assert_close(without_stats, plain_out, rtol=1e-5, atol=1e-6)


def test_level_training_step_matches_the_plain_path() -> None:
    """A whole level's loss terms and parameter gradients: blocked against materialised maps."""
    torch.manual_seed(0)
    level = FodTransformer(12, 16, FodSettings(num_heads=4, num_layers=2))
    level.set_reference(torch.randn(HEIGHT * WIDTH, 12), grid_coordinates(HEIGHT, WIDTH), (HEIGHT, WIDTH))
    tokens = torch.randn(2, HEIGHT * WIDTH, 12)

    def step(keep_maps: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        level.zero_grad(set_to_none=True)
        output = level(tokens, HEIGHT, WIDTH, keep_maps=keep_maps)
        loss = output.reconstruction.square().mean()
        for stats, sign in ((output.intra, 1.0), (output.inter, -1.0)):
            for s in stats:
                loss = loss + sign * (s.kl_attention.mean() - 0.5 * s.kl_target.mean() + 0.3 * s.entropy.mean())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in level.parameters() if p.grad is not None]

    fast_loss, fast_grads = step(keep_maps=False)
    plain_loss, plain_grads = step(keep_maps=True)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert len(fast_grads) == len(plain_grads)
    scale = max(g.abs().max().item() for g in plain_grads)  # float32 rounding is relative to the largest
    for got, want in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * scale)


def _compiled_and_eager(separable: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values and gradients through the ``torch.compile`` kernels equal the eager kernels' and the plain path's."""
    kernels = blocked_attention._Kernels()
    monkeypatch.setattr(blocked_attention, "_KERNELS", kernels)
    monkeypatch.setattr(blocked_attention._Kernels, "MIN_ELEMENTS", 0)  # compile even the test's small maps
    geo = geometry(separable)
    tensors = inputs(1)

    def run(compiled: bool | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``None``: the plain computation over full maps, the reference of both kernels."""
        for tensor in tensors:
            tensor.grad = None
        if compiled is None:
            outputs = plain(*tensors, geo)
        else:
            inv = 0.5 / sigma_from_logits(tensors[3]).square()
            outputs = correlation_attention_training(*tensors[:3], inv, geo, block=7, compiled=compiled)
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)]
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        return [o.detach() for o in outputs], [t.grad.clone() for t in tensors]

    plain_values, plain_grads = run(compiled=None)
    want_values, want_grads = run(compiled=False)
    got_values, got_grads = run(compiled=True)
    assert kernels._compiled is not None and not kernels._failed  # the compiled kernels ran
    for reference in ([*want_values, *want_grads], [*plain_values, *plain_grads]):
        for got, want in zip([*got_values, *got_grads], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    with torch.no_grad():
        inv = 0.5 / sigma_from_logits(tensors[3]).square()
        got = correlation_attention_inference(*tensors[:3], inv, geo, block=7, compiled=True)
        want = correlation_attention_inference(*tensors[:3], inv, geo, block=7, compiled=False)
    for got_tensor, want_tensor in zip(got, want, strict=True):
        torch.testing.assert_close(got_tensor, want_tensor, rtol=1e-5, atol=1e-6)


def test_compiled_kernels_match_the_eager_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    _compiled_and_eager(True, monkeypatch)


@pytest.mark.slow
def test_compiled_kernels_match_the_eager_ones_for_the_general_target(monkeypatch: pytest.MonkeyPatch) -> None:
    _compiled_and_eager(False, monkeypatch)


def test_a_failing_compiler_warns_once_and_falls_back_to_the_eager_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler (or no Triton): one warning, then the eager kernels, with the same results."""
    kernels = blocked_attention._Kernels()
    monkeypatch.setattr(blocked_attention, "_KERNELS", kernels)
    monkeypatch.setattr(blocked_attention._Kernels, "MIN_ELEMENTS", 0)
    calls = []

    def broken_compile(function, **kwargs):  # noqa: ANN001, ANN003, ANN202, ARG001
        def call(*args):  # noqa: ANN002, ANN202, ARG001
            calls.append(function.__name__)
            msg = "no working C++ compiler"
            raise RuntimeError(msg)

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    geo = geometry(True)
    query, key, value, sigma_logits = inputs(1)
    inv = 0.5 / sigma_from_logits(sigma_logits).square()
    with pytest.warns(RuntimeWarning, match="eager kernels.*compile_kernels=False") as record:
        got = correlation_attention_training(query, key, value, inv, geo, block=7, compiled=True)
        sum(o.sum() for o in got).backward()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert calls == ["forward_block"]  # tried once, never again
    want = correlation_attention_training(query, key, value, inv, geo, block=7, compiled=False)
    for got_tensor, want_tensor in zip(got, want, strict=True):
        torch.testing.assert_close(got_tensor, want_tensor)


@pytest.mark.parametrize("compile_kernels", [True, False])
def test_the_setting_reaches_every_correlation_attention(compile_kernels: bool) -> None:
    model = FodTransformer(12, 16, FodSettings(num_heads=4, compile_kernels=compile_kernels))
    attentions = [m for m in model.modules() if isinstance(m, CorrelationAttention)]
    assert attentions and all(m.compile_kernels is compile_kernels for m in attentions)
