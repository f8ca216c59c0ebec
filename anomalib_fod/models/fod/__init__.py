"""FOD: Focus the Discrepancy (Yao et al., ICCV 2023) for anomalib.

Layers, each importing only those before it: ``settings`` -> ``correlation``, ``blocked_attention``,
``transformer`` -> ``residual_statistics``, ``anomaly_map`` (the scoring: torch only, no Lightning) ->
``torch_model``, ``loss`` -> ``feature_cache``, ``fitting`` (every pass over the training images) ->
``callbacks`` (when those passes run in a fit) -> ``lightning_model`` (``Fod``, the anomalib model).
The names below are imported when first used, so importing a scoring module does not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_fod.utils import lazy_attributes

if TYPE_CHECKING:
    from .anomaly_map import AnomalyMapGenerator
    from .callbacks import ReferenceFeatureCallback, ResidualStatisticsCallback
    from .lightning_model import Fod
    from .loss import FodLoss
    from .torch_model import FodModel

__all__ = ["AnomalyMapGenerator", "Fod", "FodLoss", "FodModel", "ReferenceFeatureCallback", "ResidualStatisticsCallback"]

__getattr__ = lazy_attributes(
    __name__,
    {
        "AnomalyMapGenerator": ".anomaly_map",
        "Fod": ".lightning_model",
        "FodLoss": ".loss",
        "FodModel": ".torch_model",
        "ReferenceFeatureCallback": ".callbacks",
        "ResidualStatisticsCallback": ".callbacks",
    },
)
