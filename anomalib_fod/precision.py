"""Reduced precision emulated in torch: what a bf16 (or f16) runtime does to a model's answers, on any CPU.

A runtime that computes in bfloat16 (OpenVINO's CPU plugin on CPUs with native bf16) keeps every tensor passed
between two operations in bf16, 8 significant bits, and feeds matmuls and convolutions bf16 weights, while the
arithmetic inside one operation (the sums of a matmul or a convolution) accumulates in float32.
:func:`emulate_precision` does the same to a torch module's forward: its inputs, the inputs of its matmuls and
convolutions (weights included) and the float32 result of every operation inside it are rounded to ``dtype`` and
kept as float32, so the operations themselves run unchanged. Comparing a model's outputs with and
without it shows, on a CPU without bf16, what deploying in bf16 does to scores and maps; emulating one part of a
model at a time shows which part is sensitive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

REDUCED_DTYPES = (torch.bfloat16, torch.float16)
_DATA = "_reduced_precision_data"  # marks a tensor computed from a module's inputs or weights


def round_to(value: Any, dtype: torch.dtype) -> Any:  # noqa: ANN401 - any pytree leaf
    """A float32 tensor or a Python float rounded to ``dtype`` (nearest, ties to even), kept as float32 / float;
    anything else as is."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(dtype).to(torch.float32)
    if isinstance(value, float):
        return float(torch.tensor(value, dtype=dtype))
    return value


aten = torch.ops.aten
# Operations whose every float input a runtime converts to the reduced precision, weights included: the matmuls and
# convolutions that a bf16 runtime runs in bf16 for speed. Every other operation on data computes from its data
# inputs (already rounded) and its constant inputs as they are (OpenVINO keeps an element-wise operation's constant
# inputs in f32), and has its result rounded.
COMPUTE_OPERATIONS = frozenset(
    {
        aten.convolution,
        aten.mm,
        aten.bmm,
        aten.addmm,
        aten.baddbmm,
        aten.addbmm,
        aten._scaled_dot_product_flash_attention_for_cpu,  # noqa: SLF001 - torch's CPU attention kernel
        aten._scaled_dot_product_attention_math,  # noqa: SLF001
    },
)


class _Rounding(TorchDispatchMode):
    """Runs every aten operation on data (a tensor derived from the inputs or weights) as a reduced-precision
    runtime does: the float inputs of matmuls and convolutions rounded to ``dtype``, weights included, and every
    float32 result rounded.

    Operations on shapes alone (no input or weight in them) stay float32: in a graph of fixed shapes a runtime folds
    them into float32 constants. Where they depend on the input's size at run time, OpenVINO computes float ones in
    bf16 too; the plugin's any-size resize keeps its positions in integers for that reason. A runtime that fuses a
    chain of element-wise operations rounds only the chain's result, where this rounds each one: an emulation a
    little more pessimistic than such a runtime.
    """

    def __init__(self, dtype: torch.dtype, weights: set[int]) -> None:
        super().__init__()
        self.dtype = dtype
        self.weights = weights  # ids of the modules' parameters and buffers

    def carries_data(self, value: Any) -> bool:  # noqa: ANN401
        return isinstance(value, torch.Tensor) and (getattr(value, _DATA, False) or id(value) in self.weights)

    def rounded(self, value: Any) -> Any:  # noqa: ANN401
        return round_to(value, self.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        del types
        kwargs = kwargs or {}
        if not any(self.carries_data(value) for value in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        mutable = func._schema.is_mutable  # an in-place or out= operation: its first argument or out is the result
        if func.overloadpacket in COMPUTE_OPERATIONS:
            if mutable:
                args = (args[0], *tree_map(self.rounded, tuple(args[1:])))
                kwargs = {key: value if key == "out" else tree_map(self.rounded, value) for key, value in kwargs.items()}
            else:
                args, kwargs = tree_map(self.rounded, (args, kwargs))
        result = func(*args, **kwargs)

        def finish(value: Any) -> Any:  # noqa: ANN401
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                return value
            if mutable and value.dtype == torch.float32:
                value.copy_(value.to(self.dtype))
            elif not mutable:
                value = self.rounded(value)
            setattr(value, _DATA, True)
            return value

        return tree_map(finish, result)


@contextmanager
def emulate_precision(modules: nn.Module | Sequence[nn.Module], dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Run the forward of ``modules`` in ``dtype``'s precision inside the ``with`` block (emulated, see above).

    Inside the block the modules' forward rounds its float32 inputs, the float inputs of its matmuls and
    convolutions (their weights included) and every float32 result of an operation on data inside it; nothing of
    the modules is changed. Code outside their forward (e.g. a post-processor) keeps float32.

    Args:
        modules: one module or several (e.g. the parts of a model to emulate; the rest stays float32).
        dtype: ``torch.bfloat16`` or ``torch.float16`` (which overflows above 65504, as a runtime in f16 does).

    Example:
        >>> with torch.no_grad(), emulate_precision(model.model):  # doctest: +SKIP
        ...     bf16_prediction = model(images)
    """
    if dtype not in REDUCED_DTYPES:
        msg = f"dtype must be one of {REDUCED_DTYPES}, got {dtype}."
        raise ValueError(msg)
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    tensors = {id(t): t for module in modules for t in (*module.parameters(), *module.buffers())}
    mode = _Rounding(dtype, set(tensors))
    depth = [0]  # modules may call each other: enter the mode once, at the outermost forward

    def enter(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        del module
        if depth[0] == 0:
            mode.__enter__()
        depth[0] += 1

        def as_data(value: Any) -> Any:  # noqa: ANN401
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = round_to(value, dtype)
                setattr(value, _DATA, True)
            return value

        return tree_map(as_data, args)

    def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:  # noqa: ANN401
        del module, args, output
        depth[0] -= 1
        if depth[0] == 0:
            mode.__exit__(None, None, None)

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for handle in handles:
            handle.remove()
        if depth[0] > 0:  # a forward raised inside the block: its hook never left the mode
            mode.__exit__(None, None, None)
