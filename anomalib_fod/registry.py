"""Make the plugin's models visible to anomalib's own model lookup.

``anomalib.models.get_model`` (used by ``anomalib benchmark`` and model names in configs)
only resolves classes that are attributes of ``anomalib.models``. Attaching ours there is the
supported way to use an out-of-tree model with those tools.
"""

from __future__ import annotations


def register_with_anomalib() -> None:
    """Expose the plugin's models as ``anomalib.models.<Name>``."""
    import anomalib.models  # noqa: PLC0415 - keep import-time cost where it is needed

    from .models import Cdo, Ed, Fod  # noqa: PLC0415

    for model in (Fod, Ed, Cdo):
        if getattr(anomalib.models, model.__name__, None) is not model:
            setattr(anomalib.models, model.__name__, model)
