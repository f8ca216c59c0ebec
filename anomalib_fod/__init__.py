"""anomalib-fod: FOD (Focus the Discrepancy, ICCV 2023) and its relatives ED and CDO as an anomalib plugin.

``from anomalib_fod import Fod`` (or ``Ed``, ``Cdo``) gives an ``anomalib.models.AnomalibModule``. Taking a model
from this package also attaches the three to ``anomalib.models`` (:func:`register_with_anomalib`), so short class
names work in anomalib's CLI, its ``get_model`` and ``anomalib benchmark``; the ``anomalib-fod`` command does that
before anything else. ``import anomalib_fod`` alone imports neither the models nor Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import register_with_anomalib

if TYPE_CHECKING:
    from .models import Cdo, Ed, Fod

__version__ = "0.1.0"
__all__ = ["Cdo", "Ed", "Fod", "register_with_anomalib"]

MODELS = ("Cdo", "Ed", "Fod")


def __getattr__(name: str) -> Any:  # noqa: ANN401
    """``anomalib_fod.Fod`` and its siblings, imported (and attached to ``anomalib.models``) on first use."""
    if name not in MODELS:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    register_with_anomalib()
    from . import models  # noqa: PLC0415

    return getattr(models, name)
