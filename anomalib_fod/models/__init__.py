"""Models of the anomalib-fod plugin."""

from .cdo import Cdo
from .ed import Ed
from .fod import Fod

__all__ = ["Cdo", "Ed", "Fod"]
