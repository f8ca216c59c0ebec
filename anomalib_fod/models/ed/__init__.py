"""ED: Emphasize Differences, a FOD variant (``from anomalib_fod import Ed``)."""

from .lightning_model import Ed

__all__ = ["Ed"]
