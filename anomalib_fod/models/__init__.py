"""Models of the anomalib-fod plugin (imported when first used: see :func:`anomalib_fod.utils.lazy_attributes`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_fod.utils import lazy_attributes

if TYPE_CHECKING:
    from .cdo import Cdo
    from .ed import Ed
    from .fod import Fod

__all__ = ["Cdo", "Ed", "Fod"]

__getattr__ = lazy_attributes(__name__, {"Cdo": ".cdo", "Ed": ".ed", "Fod": ".fod"})
