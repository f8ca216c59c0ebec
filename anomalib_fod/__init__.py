"""anomalib-fod: FOD (Focus the Discrepancy, ICCV 2023) and its relatives ED and CDO as an anomalib plugin.

``from anomalib_fod import Fod`` (or ``Ed``, ``Cdo``) gives an ``anomalib.models.AnomalibModule``; importing the
package also registers the models under ``anomalib.models`` so short class names work in
anomalib's CLI and in ``anomalib benchmark``.
"""

from .models import Cdo, Ed, Fod
from .registry import register_with_anomalib

__version__ = "0.1.0"
__all__ = ["Cdo", "Ed", "Fod", "register_with_anomalib"]

register_with_anomalib()
