"""Inference with an exported model: the image sizes a graph accepts, and a clear error otherwise.

A model exported without ``input_size`` accepts images of any size (it resizes inside the graph).
One exported with ``input_size=(H, W)`` has a static input shape and accepts only ``H x W`` images;
OpenVINO then rejects any other size with its internal shape check ("Can't set the input tensor
... incompatible"), which names neither what the model expects in user terms nor a remedy. A graph
cannot carry a check of its own (ONNX and OpenVINO have no assertion operation), and anomalib's
``OpenVINOInferencer`` has no hook before it calls OpenVINO, so the check lives here: in
:class:`OpenVINOInferencer` (a drop-in subclass of anomalib's) and in ``anomalib-fod predict-folder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from anomalib.deploy import OpenVINOInferencer as AnomalibOpenVINOInferencer


class ImageSizeError(ValueError):
    """An image whose size a fixed-size exported graph does not accept."""


def static_image_size(partial_shape: Any) -> tuple[int, int] | None:  # noqa: ANN401 - openvino.PartialShape
    """``(H, W)`` of a static ``(N, C, H, W)`` shape; ``None`` when height or width is dynamic."""
    if partial_shape.rank.is_dynamic or partial_shape.rank.get_length() != 4:  # noqa: PLR2004
        return None
    height, width = partial_shape[2], partial_shape[3]
    if not (height.is_static and width.is_static):
        return None
    return height.get_length(), width.get_length()


def check_image_size(expected: tuple[int, int] | None, image_size: Sequence[int], source: str = "the model") -> None:
    """Refuse an image that a fixed-size graph does not accept, naming both sizes and the remedies.

    Args:
        expected: the graph's static ``(H, W)``; ``None`` for a graph that accepts any size.
        image_size: ``(h, w)`` of the image.
        source: what to call the model in the message (e.g. its path).

    Raises:
        ImageSizeError: ``image_size`` differs from ``expected``.
    """
    got = (int(image_size[0]), int(image_size[1]))
    if expected is None or got == tuple(expected):
        return
    msg = (
        f"{source} was exported with a fixed input size of {expected[0]}x{expected[1]} (height x width) and "
        f"accepts only images of that size; this image is {got[0]}x{got[1]}. Resize it to "
        f"{expected[0]}x{expected[1]} first, or export the model again without input_size: the plugin's models "
        "then accept images of any size and resize them inside the graph exactly as in training."
    )
    raise ImageSizeError(msg)


class OpenVINOInferencer(AnomalibOpenVINOInferencer):
    """anomalib's ``OpenVINOInferencer`` that refuses a wrong image size with :class:`ImageSizeError`.

    Same arguments and results as ``anomalib.deploy.OpenVINOInferencer``; only a fixed-size graph
    fed an image of another size behaves differently (a clear error instead of OpenVINO's).

    Attributes:
        input_size: the graph's static ``(H, W)``, or ``None`` when it accepts any size.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - anomalib's arguments
        super().__init__(*args, **kwargs)
        self.input_size = static_image_size(self.input_blob.get_partial_shape())

    def pre_process(self, image: np.ndarray) -> np.ndarray:
        """anomalib's pre-processing (``(N, C, H, W)`` float), then the size check."""
        batch = super().pre_process(image)
        check_image_size(self.input_size, batch.shape[-2:])
        return batch
