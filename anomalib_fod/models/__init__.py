"""Models of the anomalib-fod plugin."""

from .fod import Fod

__all__ = ["Fod"]
