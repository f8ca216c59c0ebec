"""``anomalib-fod predict-folder``: run an exported OpenVINO model over a folder of images.

Example:
    anomalib-fod predict-folder --model results/weights/openvino/model.xml \\
        --input images/ --output predictions/ --device CPU

Every image file under ``--input`` (recursively) is read, converted to RGB floats in ``[0, 1]``
(as anomalib's own readers do) and passed through the model at its own size: a model exported
without ``input_size`` (the default) resizes it inside the graph exactly as in training. A graph
with a fixed input size gets images of that size as they are; other images are resized to it
(bilinear, antialiased: anomalib's default training resize) only when that size is also the size of
its anomaly map, i.e. the graph was exported at the training size. Anything else is skipped with an
error naming both sizes. The command writes

- ``<output>/predictions.csv`` with ``path, pred_score, pred_label`` per image;
- ``<output>/overlays/<relative path>.png``: the anomaly map (returned at the training size) as a
  heat map over the image, at the image's original size.

The model is compiled in float32 (the trained model's answers) unless ``--precision`` asks for bf16, f16 or the
device's own choice (``anomalib_fod.inference``); the precision compiled is printed on stderr.

Grey, RGB, RGBA, palette, 16-bit and JPEG files are all accepted. A file that cannot be read
(corrupt, truncated, not an image) is reported by name on stderr and skipped. The exit status is
non-zero only when no image at all could be processed.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map
from PIL import Image
from torchvision.transforms.v2.functional import resize
from tqdm.auto import tqdm

from anomalib_fod.inference import OpenVINOModel, Precision, PrecisionError, check_image_size, static_image_size

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
CSV_NAME = "predictions.csv"
OVERLAY_DIR = "overlays"
OVERLAY_ALPHA = 0.45
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
UINT16_MAX = 65535.0


class ModelInputError(ValueError):
    """The model's input is not an ``(N, 3, H, W)`` image tensor, or its outputs are not anomalib's."""


@dataclass
class Prediction:
    """One image's result."""

    path: Path
    pred_score: float
    pred_label: bool | None
    anomaly_map: np.ndarray  # (h, w) as the model returns it (the training size)


def find_images(root: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``root`` (or ``root`` itself), sorted, skipping anything inside ``exclude``."""
    if root.is_file():
        return [root]
    exclude = exclude.resolve() if exclude is not None else None
    files = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        files.append(path)
    return files


def load_rgb(path: Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` float32 RGB in ``[0, 1]``.

    8-bit images go through Pillow's RGB conversion exactly like ``anomalib.data.utils.read_image``
    (alpha is dropped, palettes are expanded, grey is replicated). 16-bit (and 32-bit integer)
    grey images are scaled from their full 16-bit range instead of being clipped at 255.

    Raises:
        OSError: unreadable, truncated or unsupported file (Pillow's errors are ``OSError``s).
    """
    with Image.open(path) as image:
        image.load()  # decode now so a truncated file fails here
        if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
            grey = np.asarray(image, dtype=np.float32)
            scale = UINT16_MAX if grey.max(initial=0.0) <= UINT16_MAX else float(grey.max())
            grey = np.clip(grey / scale, 0.0, 1.0)
            return np.repeat(grey[..., None], 3, axis=-1)
        if image.mode == "F":
            grey = np.asarray(image, dtype=np.float32)
            peak = float(grey.max(initial=0.0))
            grey = np.clip(grey / (255.0 if peak > 1.0 else 1.0), 0.0, 1.0)
            return np.repeat(grey[..., None], 3, axis=-1)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # Pillow's recommended path for palette transparency
        rgb = image.convert("RGB")
        return np.asarray(rgb, dtype=np.float32) / 255.0


def to_model_input(image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """``(H, W, 3)`` float image -> ``(1, 3, H, W)``, resized to ``size`` if given and different.

    The resize is torchvision's bilinear with antialiasing, anomalib's default training resize.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if size is not None and tuple(tensor.shape[-2:]) != tuple(size):
        tensor = resize(tensor, list(size), antialias=True)
    return tensor.unsqueeze(0).contiguous().numpy()


def heat_map_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """Blend anomalib's ``jet`` heat map of ``anomaly_map`` (values in ``[0, 1]``) over ``image`` at its own size."""
    heat = visualize_anomaly_map(np.clip(np.asarray(anomaly_map, dtype=np.float32), 0.0, 1.0))
    base = Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return overlay_image(base, heat, alpha=alpha).convert("RGB")


def overlay_paths(images: Sequence[Path], root: Path, output: Path) -> dict[Path, Path]:
    """``<output>/overlays/<relative path with .png>``; inputs differing only in extension keep it."""
    base = root if root.is_dir() else root.parent
    relative = {path: path.relative_to(base) for path in images}
    targets: dict[Path, list[Path]] = {}
    for path, rel in relative.items():
        targets.setdefault(rel.with_suffix(".png"), []).append(path)
    result = {}
    for target, sources in targets.items():
        for path in sources:
            rel = relative[path]
            name = target if len(sources) == 1 else rel.with_name(f"{rel.stem}_{rel.suffix.lstrip('.')}.png")
            result[path] = output / OVERLAY_DIR / name
    return result


def folder_model(path: Path, device: str = "CPU", precision: Precision = "f32") -> OpenVINOModel:
    """Compile an exported anomaly model for predict-folder, checking its input and outputs.

    Raises:
        ModelInputError: the input is not ``(N, 3, H, W)`` with batch 1 or dynamic, or the outputs lack
            ``pred_score`` or ``anomaly_map``.
        PrecisionError: ``precision`` is not one the device computes in natively.
    """
    model = OpenVINOModel(path, device, precision)
    shape = model.compiled.input(0).get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:  # noqa: PLR2004
        msg = f"{path}: expected a (N, 3, H, W) image input, got {shape}."
        raise ModelInputError(msg)
    if shape[0].is_static and shape[0].get_length() != 1:
        msg = f"{path}: batch size {shape[0].get_length()} is fixed; predict-folder needs batch 1 or dynamic."
        raise ModelInputError(msg)
    if "anomaly_map" not in model.output_names or "pred_score" not in model.output_names:
        msg = f"{path}: expected outputs 'pred_score' and 'anomaly_map', got {sorted(model.output_names)}."
        raise ModelInputError(msg)
    return model


def map_size(model: OpenVINOModel) -> tuple[int, int] | None:
    """The static ``(H, W)`` of the model's anomaly map (the training size), if known."""
    shape = model.compiled.output("anomaly_map").get_partial_shape()
    return static_image_size(shape) if shape.rank.is_static and shape.rank.get_length() == 4 else None  # noqa: PLR2004


def model_input(model: OpenVINOModel, image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float image -> the ``(1, 3, h, w)`` batch the model's graph takes.

    Raises:
        ImageSizeError: a fixed-size graph, not at the training size, and an image of another size.
    """
    size = tuple(image.shape[:2])
    if model.input_size is None or size == model.input_size:
        return to_model_input(image)
    if map_size(model) != model.input_size:
        check_image_size(model.input_size, size, model.source)
    # A graph exported at the training size: resizing here is what training did.
    return to_model_input(image, model.input_size)


def predict_images(
    model: OpenVINOModel,
    images: Iterable[Path],
    output: Path,
    root: Path,
    progress: bool = True,
) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Predict every image, writing overlays; return predictions and ``(path, reason)`` of skipped files."""
    images = list(images)
    targets = overlay_paths(images, root, output)
    predictions, skipped = [], []
    for path in tqdm(images, desc="predict-folder", unit="img", disable=not progress, file=sys.stderr):
        try:
            image = load_rgb(path)
            batch = model_input(model, image)
        except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for bad files; ImageSizeError
            reason = f"{type(error).__name__}: {error}"
            skipped.append((path, reason))
            tqdm.write(f"predict-folder: skipping {path}: {reason}", file=sys.stderr)
            continue
        outputs = model(batch)
        anomaly_map = np.asarray(outputs["anomaly_map"], dtype=np.float32)
        anomaly_map = anomaly_map.reshape(anomaly_map.shape[-2:])
        label = outputs.get("pred_label")
        prediction = Prediction(
            path=path,
            pred_score=float(np.asarray(outputs["pred_score"]).reshape(-1)[0]),
            pred_label=None if label is None else bool(np.asarray(label).reshape(-1)[0]),
            anomaly_map=anomaly_map,
        )
        target = targets[path]
        target.parent.mkdir(parents=True, exist_ok=True)
        heat_map_overlay(image, anomaly_map).save(target)
        predictions.append(prediction)
    return predictions, skipped


def write_csv(predictions: Sequence[Prediction], path: Path) -> None:
    """``path, pred_score, pred_label`` (label as 0/1, empty when the model has no threshold)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "pred_score", "pred_label"])
        for prediction in predictions:
            label = "" if prediction.pred_label is None else int(prediction.pred_label)
            writer.writerow([str(prediction.path), f"{prediction.pred_score:.6f}", label])


def predict_folder(  # noqa: PLR0913 - the command's options
    model: Path,
    input: Path,  # noqa: A002 - the option is --input
    output: Path,
    device: str = "CPU",
    precision: Precision = "f32",
    no_progress: bool = False,
) -> int:
    """Run an exported OpenVINO anomaly model over all images in a folder (recursively).

    Writes heat-map overlays and a CSV of scores and labels.

    Args:
        model: exported model: model.xml (or .onnx).
        input: folder of images (searched recursively).
        output: folder for predictions.csv and overlays/.
        device: OpenVINO device.
        precision: what the device computes in: f32 (the trained model's answers), bf16 or f16 (faster where
            the device has them natively, other scores; an error where it has not), or device (its own choice:
            bf16 on CPUs with native bf16). The precision compiled is printed.
        no_progress: hide the progress bar.

    Returns:
        0 when at least one image was processed, 1 when none was, 2 for a missing model or input, a model that is
        not an anomaly model, or a precision the device does not have.
    """
    if not model.is_file():
        print(f"predict-folder: model file {model} not found.", file=sys.stderr)
        return 2
    if not input.exists():
        print(f"predict-folder: input {input} does not exist.", file=sys.stderr)
        return 2
    images = find_images(input, exclude=output)
    if not images:
        print(f"predict-folder: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {input}.", file=sys.stderr)
        return 1
    try:
        network = folder_model(model, device, precision)
    except (ModelInputError, PrecisionError) as error:
        print(f"predict-folder: {error}", file=sys.stderr)
        return 2
    print(f"predict-folder: {model} compiled for {device} in {network.precision}", file=sys.stderr)
    predictions, skipped = predict_images(network, images, output, input, progress=not no_progress)
    csv_path = output / CSV_NAME
    if predictions:
        write_csv(predictions, csv_path)
    print(
        f"predict-folder: {len(predictions)} image(s) processed, {len(skipped)} skipped"
        + (f"; results in {csv_path}" if predictions else ""),
        file=sys.stderr,
    )
    return 0 if predictions else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalib-fod predict-folder`` with command-line ``argv``; returns the exit status."""
    from anomalib_fod.cli import run_command  # noqa: PLC0415

    return run_command("predict-folder", argv)


if __name__ == "__main__":
    sys.exit(main())
