"""Small runtime helpers."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal


def as_image_size(size: Sequence[int] | int) -> tuple[int, int]:
    """``256`` or ``[256]`` or ``[h, w]`` -> ``(h, w)``; a clear error for anything else or < 32 px."""
    values = [int(size)] if isinstance(size, int) else [int(v) for v in size]
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 32:  # noqa: PLR2004 - the stride-16 level needs 2x2 cells
        msg = f"image_size must be one or two integers >= 32, got {size!r}."
        raise ValueError(msg)
    return values[0], values[1]


def plain_value(value: Any) -> Any:  # noqa: ANN401
    """Lists and tuples compare equal (YAML gives lists, Python code tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:  # noqa: ANN401
    """The values of a ``Literal[...]`` annotation (``None`` for any other annotation)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def check_choice(name: str, value: Any, annotation: Any) -> None:  # noqa: ANN401
    """Raise ``ValueError`` when ``value`` is not one of the ``Literal`` ``annotation``'s values."""
    choices = literal_choices(annotation)
    if choices is not None and value not in choices:
        msg = f"{name} must be one of {choices}, got {value!r}."
        raise ValueError(msg)


def check_choices(instance: Any) -> None:  # noqa: ANN401
    """Check every ``Literal``-typed field of a dataclass instance (``typing.get_args`` on its hints)."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        check_choice(field.name, getattr(instance, field.name), hints[field.name])


def lazy_attributes(package: str, sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each name of ``sources`` from its module (relative to ``package``)
    on first use, so importing the package does not import what those modules import (Lightning, anomalib's
    model zoo). ``sources``: name -> module, e.g. ``{"Fod": ".lightning_model"}``."""

    def __getattr__(name: str) -> Any:  # noqa: ANN401, N807
        if name not in sources:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        return getattr(importlib.import_module(sources[name], package), name)

    return __getattr__
