"""CDO: Collaborative Discrepancy Optimization (Cao et al., IEEE TII 2023) for anomalib."""

from .anomaly_map import AnomalyMapGenerator
from .lightning_model import Cdo
from .loss import CdoLoss
from .synthetic import PerlinGenerator, WhiteNoiseGenerator, make_anomaly_generator
from .torch_model import CdoModel

__all__ = [
    "AnomalyMapGenerator",
    "Cdo",
    "CdoLoss",
    "CdoModel",
    "PerlinGenerator",
    "WhiteNoiseGenerator",
    "make_anomaly_generator",
]
