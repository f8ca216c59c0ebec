"""Bundled demo data (``battery_weld``, as the ``BatteryWeld`` datamodule) and a synthetic MVTec-layout generator."""

from .embedded import BatteryWeld

__all__ = ["BatteryWeld"]
