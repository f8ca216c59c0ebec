"""The embedded battery-weld images as a datamodule that works from any working directory.

The images ship inside the package (``anomalib_fod/data/battery_weld``, CC BY-SA 4.0, see its
``ATTRIBUTION.md``) in MVTec AD layout: 37 good training images, 35 good and 93 defective test
images with masks. ``BatteryWeld`` is anomalib's ``MVTecAD`` pointed at them, so the demo and the
``*_battery_weld`` configs need no path, whether the package is a checkout or an installed wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anomalib.data import MVTecAD

EMBEDDED_ROOT = Path(__file__).resolve().parent
BATTERY_WELD = "battery_weld"


class BatteryWeld(MVTecAD):
    """anomalib's ``MVTecAD`` datamodule on the embedded ``battery_weld`` category.

    Args:
        train_batch_size: training batch size (FOD learns per optimizer step: keep it small).
        eval_batch_size: validation and test batch size.
        num_workers: data-loader workers.
        **kwargs: any other ``MVTecAD`` argument except ``root`` and ``category``.
    """

    def __init__(
        self,
        train_batch_size: int = 1,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        **kwargs: Any,  # noqa: ANN401 - MVTecAD's arguments
    ) -> None:
        loading = {"train_batch_size": train_batch_size, "eval_batch_size": eval_batch_size, "num_workers": num_workers}
        super().__init__(root=EMBEDDED_ROOT, category=BATTERY_WELD, **loading, **kwargs)
