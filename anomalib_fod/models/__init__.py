"""Models of the anomalib-fod plugin."""

from .ed import Ed
from .fod import Fod

__all__ = ["Ed", "Fod"]
