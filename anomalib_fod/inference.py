"""Inference with an exported model: one OpenVINO wrapper, its precision, and the image sizes a graph accepts.

:class:`OpenVINOModel` is the one place the plugin compiles an OpenVINO model: ``anomalib-fod predict-folder``,
:class:`OpenVINOInferencer` (a drop-in subclass of anomalib's) and the benchmarks all go through it.

**Precision.** OpenVINO's CPU plugin runs a model in bfloat16 by default on CPUs with native bf16 (AVX512_BF16,
e.g. AMD EPYC from Zen 4; AMX on Intel Xeon from Sapphire Rapids), and its GPU plugin in float16. bf16 keeps 8
significant bits, and FOD's whitened score magnifies what that does to the backbone's features, so the same
graph gives other scores and maps there than the trained model (docs/deploy.md, "Precision"). The wrapper
therefore compiles in float32 unless asked otherwise (``precision="bf16"`` or ``"f16"`` where the device runs
it natively, ``"device"`` for the device's own choice), reads back the precision the device actually compiled,
and refuses a precision the device substituted (OpenVINO's CPU plugin compiles an ``f16`` request in bf16, or
in f32, without a word).

**Image sizes.** A model exported without ``input_size`` accepts images of any size (it resizes inside the
graph). One exported with ``input_size=(H, W)`` has a static input shape and accepts only ``H x W`` images;
OpenVINO then rejects any other size with its internal shape check ("Can't set the input tensor ...
incompatible"), which names neither what the model expects in user terms nor a remedy. A graph cannot carry a
check of its own (ONNX and OpenVINO have no assertion operation), and anomalib's ``OpenVINOInferencer`` has no
hook before it calls OpenVINO, so the check lives here: in :class:`OpenVINOInferencer` and in
``anomalib-fod predict-folder``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anomalib.deploy import OpenVINOInferencer as AnomalibOpenVINOInferencer

from anomalib_fod.utils import check_choice

Precision = Literal["f32", "bf16", "f16", "device"]
PRECISION_HINT = "INFERENCE_PRECISION_HINT"  # OpenVINO's property for the precision a device computes in


class ImageSizeError(ValueError):
    """An image whose size a fixed-size exported graph does not accept."""


class PrecisionError(ValueError):
    """A precision the device does not compute in natively, or two different precisions asked for."""


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


def precision_name(value: Any) -> str:  # noqa: ANN401 - an openvino.Type or a string
    """``"f32"``, ``"bf16"``, ``"f16"``, ... from OpenVINO's element type or its name."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value).lower()


def compiled_precision(compiled: Any) -> str:  # noqa: ANN401 - openvino.CompiledModel
    """The precision a compiled model computes in, read back from it (``INFERENCE_PRECISION_HINT``).

    A virtual device (``AUTO``) keeps the value in each device's properties: one precision for all, else
    ``"CPU: f32, GPU: f16"``; ``"unknown"`` where the device reports none.
    """
    try:
        return precision_name(compiled.get_property(PRECISION_HINT))
    except RuntimeError:  # AUTO and MULTI do not have the property themselves
        pass
    try:
        devices = compiled.get_property("DEVICE_PROPERTIES")
    except RuntimeError:
        return "unknown"
    found = {name: precision_name(props[PRECISION_HINT]) for name, props in devices.items() if PRECISION_HINT in props}
    if not found:
        return "unknown"
    if len(set(found.values())) == 1:
        return next(iter(found.values()))
    return ", ".join(f"{name}: {value}" for name, value in sorted(found.items()))


def precision_config(precision: Precision | None, config: Mapping[str, Any] | None) -> tuple[Precision, dict[str, Any]]:
    """The precision to compile in and the OpenVINO properties that ask for it.

    ``precision=None`` takes ``config``'s ``INFERENCE_PRECISION_HINT`` where it has one, else ``"f32"``.

    Raises:
        PrecisionError: ``precision`` and ``config``'s hint differ.
        ValueError: ``precision`` is not one of :data:`Precision`.
    """
    properties = dict(config or {})
    given = properties.get(PRECISION_HINT)
    given = None if given is None else precision_name(given)
    chosen = precision if precision is not None else (given or "f32")
    check_choice("precision", chosen, Precision)
    if given is not None and given != chosen:
        msg = f"precision={chosen!r} but config sets {PRECISION_HINT}={given!r}: give the precision once."
        raise PrecisionError(msg)
    if chosen == "device":
        properties.pop(PRECISION_HINT, None)
    else:
        properties[PRECISION_HINT] = chosen
    return chosen, properties


class OpenVINOModel:
    """An OpenVINO model compiled in the precision asked for, with the precision the device compiled read back.

    Args:
        model: an ``.xml`` (with its ``.bin``; a ``.bin`` path finds its ``.xml``) or ``.onnx`` file, the
            ``(xml, bin)`` contents as bytes, or an ``openvino.Model``.
        device: OpenVINO device, e.g. ``"CPU"``, ``"GPU"``, ``"AUTO"``.
        precision: ``"f32"`` (the trained model's arithmetic), ``"bf16"`` or ``"f16"`` (where the device computes
            in it natively: faster, other scores), or ``"device"`` (whatever the device chooses: bf16 on CPUs
            with native bf16, f16 on GPUs). ``None``: ``config``'s ``INFERENCE_PRECISION_HINT``, else ``"f32"``.
        config: other OpenVINO properties, e.g. ``{"INFERENCE_NUM_THREADS": 1}``.
        cache_dir: folder for OpenVINO's cache of compiled models (``None``: no cache).

    Attributes:
        compiled: the ``openvino.CompiledModel``.
        precision: the precision it was compiled in, read back from it (e.g. ``"f32"``).
        input_size: the static ``(H, W)`` of a fixed-size ``(N, C, H, W)`` input; ``None`` for any size.
        output_names: every name of every output.

    Raises:
        PrecisionError: the device compiled another precision than the one asked for (it has no native
            support), or ``precision`` and ``config`` disagree.
        ValueError: an unknown precision or file type.
    """

    def __init__(
        self,
        model: str | Path | tuple[bytes, bytes] | Any,  # noqa: ANN401 - openvino.Model, an optional dependency
        device: str = "CPU",
        precision: Precision | None = "f32",
        config: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        import openvino as ov  # noqa: PLC0415 - optional dependency

        self.requested, properties = precision_config(precision, config)
        core = ov.Core()
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self.source = self._describe(model)
        self.model = self._read(core, model)
        self.device = device
        self.compiled = core.compile_model(self.model, device, properties)
        self.precision = compiled_precision(self.compiled)
        if self.requested != "device" and self.precision != self.requested:
            self._refuse(core)
        self.input_size = static_image_size(self.compiled.input(0).get_partial_shape())
        self.output_names = {name for output in self.compiled.outputs for name in output.get_names()}

    @staticmethod
    def _describe(model: Any) -> str:  # noqa: ANN401
        if isinstance(model, (str, Path)):
            return str(model)
        return "the model" if isinstance(model, tuple) else f"model {getattr(model, 'friendly_name', '')!r}"

    @staticmethod
    def _read(core: Any, model: Any) -> Any:  # noqa: ANN401 - openvino types
        if isinstance(model, tuple):
            return core.read_model(model=model[0], weights=model[1])
        if not isinstance(model, (str, Path)):
            return model
        path = Path(model)
        if path.suffix == ".bin":
            path = path.with_suffix(".xml")
        if path.suffix not in {".xml", ".onnx"}:
            msg = f"{model}: an OpenVINO model is an .xml (with its .bin) or an .onnx file."
            raise ValueError(msg)
        return core.read_model(str(path))

    def _refuse(self, core: Any) -> None:  # noqa: ANN401
        try:
            capabilities = ", ".join(core.get_property(self.device, "OPTIMIZATION_CAPABILITIES"))
        except RuntimeError:
            capabilities = "not reported"
        msg = (
            f"{self.source}: asked for precision {self.requested!r}, but {self.device} compiled the model in "
            f"{self.precision}: the device does not compute in {self.requested} natively (its optimization "
            f"capabilities: {capabilities}). Use precision 'f32' (the trained model's answers) or 'device' (its "
            "own choice)."
        )
        raise PrecisionError(msg)

    def __call__(self, inputs: np.ndarray | Mapping[Any, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (the first input's array, or arrays by input); the outputs by name."""
        result = self.compiled(inputs)
        return {name: result[name] for name in self.output_names}


class OpenVINOInferencer(AnomalibOpenVINOInferencer):
    """anomalib's ``OpenVINOInferencer``, compiled in float32 by default, refusing a wrong image size clearly.

    Same arguments and results as ``anomalib.deploy.OpenVINOInferencer``, plus ``precision``; it compiles through
    :class:`OpenVINOModel`, so it gives the trained model's answers on every CPU unless ``precision`` (or
    ``config``'s ``INFERENCE_PRECISION_HINT``) asks for another. A fixed-size graph fed an image of another size
    raises :class:`ImageSizeError` instead of OpenVINO's shape error.

    Args:
        path: as anomalib's: ``.xml``/``.bin``/``.onnx`` file or ``(xml, bin)`` bytes.
        device: as anomalib's (default ``"AUTO"``).
        config: as anomalib's: OpenVINO properties.
        precision: see :class:`OpenVINOModel` (``None``: ``config``'s hint, else ``"f32"``).

    Attributes:
        precision: the precision the model was compiled in, read back from it.
        input_size: the graph's static ``(H, W)``, or ``None`` when it accepts any size.
    """

    def __init__(
        self,
        path: str | Path | tuple[bytes, bytes],
        device: str | None = "AUTO",
        config: dict | None = None,
        precision: Precision | None = None,
    ) -> None:
        self.requested_precision = precision
        super().__init__(path, device=device, config=config)

    def load_model(self, path: str | Path | tuple[bytes, bytes]) -> tuple[Any, Any, Any]:
        """Compile through :class:`OpenVINOModel` (with anomalib's ``./openvino_cache``); anomalib's triple."""
        runtime = OpenVINOModel(path, self.device, self.requested_precision, self.config, cache_dir="openvino_cache")
        self.precision = runtime.precision
        self.input_size = runtime.input_size
        compiled = runtime.compiled
        return compiled.input(0), compiled.output(0), compiled

    def pre_process(self, image: np.ndarray) -> np.ndarray:
        """anomalib's pre-processing (``(N, C, H, W)`` float), then the size check."""
        batch = super().pre_process(image)
        check_image_size(self.input_size, batch.shape[-2:])
        return batch
