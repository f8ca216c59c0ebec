"""FOD: Focus the Discrepancy (Yao et al., ICCV 2023) for anomalib."""

from .anomaly_map import AnomalyMapGenerator
from .lightning_model import Fod
from .loss import FodLoss
from .reference import ReferenceFeatureCallback
from .torch_model import FodModel

__all__ = ["AnomalyMapGenerator", "Fod", "FodLoss", "FodModel", "ReferenceFeatureCallback"]
