"""Parity of exported models with ``Engine.predict`` on real images at their own size (test helper).

Import as ``from export_parity import ...`` (the tests folder is on ``sys.path``). Each inference
path fills an :class:`Outputs` keyed by file name; :func:`parity` gives the worst differences and
:func:`assert_parity` checks them against the bounds of docs/deploy.md ("Parity with `Engine.predict`"):

- ``pred_score`` within ``SCORE_RTOL`` relative;
- anomaly maps within ``MAP_TOL`` of the reference map's range (max abs difference);
- no label flipped, except where float rounding can decide it: an image whose reference score lies
  closer to the threshold (0.5 after anomalib's normalisation) than the two scores differ. The
  image that defines the adaptive threshold scores exactly 0.5 and flips on 1e-7.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCORE_RTOL = 1e-3
MAP_TOL = 1e-3  # of the map's range
THRESHOLD = 0.5  # normalised scores


@dataclass
class Outputs:
    """Per-image outputs of one inference path, keyed by file name."""

    score: dict[str, float] = field(default_factory=dict)
    label: dict[str, bool] = field(default_factory=dict)
    anomaly_map: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, score: object, label: object, anomaly_map: object) -> None:
        self.score[name] = float(np.asarray(score, dtype=np.float64).reshape(-1)[0])
        self.label[name] = bool(np.asarray(label).reshape(-1)[0])
        anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
        self.anomaly_map[name] = anomaly_map.reshape(anomaly_map.shape[-2:])


def map_range(anomaly_map: np.ndarray) -> float:
    """Value range of one map; a flat map counts as range 1 (its values are in [0, 1])."""
    spread = float(anomaly_map.max() - anomaly_map.min())
    return spread if spread > 1e-6 else 1.0  # noqa: PLR2004


def unexplained_flips(reference: Outputs, other: Outputs) -> list[str]:
    """Images whose label differs although their score is farther from the threshold than the drift."""
    return [
        name
        for name, label in reference.label.items()
        if other.label[name] != label
        and abs(reference.score[name] - THRESHOLD) > abs(other.score[name] - reference.score[name])
    ]


def parity(reference: Outputs, other: Outputs) -> dict[str, float]:
    """Worst-case differences of ``other`` against ``reference`` (same images)."""
    assert set(other.score) == set(reference.score)
    names = sorted(reference.score)
    for name in names:
        assert other.anomaly_map[name].shape == reference.anomaly_map[name].shape, name
    return {
        "images": len(names),
        "score_max_abs": max(abs(other.score[n] - reference.score[n]) for n in names),
        "score_max_rel": max(abs(other.score[n] - reference.score[n]) / max(abs(reference.score[n]), 1e-12) for n in names),
        "map_max_abs": max(float(np.abs(other.anomaly_map[n] - reference.anomaly_map[n]).max()) for n in names),
        "map_max_abs_over_range": max(
            float(np.abs(other.anomaly_map[n] - reference.anomaly_map[n]).max()) / map_range(reference.anomaly_map[n])
            for n in names
        ),
        "label_flips": sum(other.label[n] != reference.label[n] for n in names),
        "unexplained_flips": len(unexplained_flips(reference, other)),
    }


def assert_parity(reference: Outputs, other: Outputs, what: str) -> dict[str, float]:
    """Assert the issue's bounds; return the measured differences."""
    result = parity(reference, other)
    assert result["score_max_rel"] <= SCORE_RTOL, (what, result)
    assert result["map_max_abs_over_range"] <= MAP_TOL, (what, result)
    assert not unexplained_flips(reference, other), (what, unexplained_flips(reference, other))
    return result


def copy_images(sources: Iterable[Path], folder: Path) -> Path:
    """Copy image files unchanged into ``folder`` as ``<parent>_<name>`` (flat, unique names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        (folder / f"{source.parent.name}_{source.name}").write_bytes(source.read_bytes())
    return folder


def engine_outputs(engine: object, model: object, folder: Path) -> Outputs:
    """``Engine.predict`` on every image of ``folder`` (anomalib's reference)."""
    outputs = Outputs()
    for batch in engine.predict(model, data_path=folder, return_predictions=True):
        for i, path in enumerate(batch.image_path):
            outputs.add(Path(path).name, batch.pred_score[i], batch.pred_label[i], batch.anomaly_map[i])
    return outputs


def openvino_outputs(model_path: Path, folder: Path, config: dict | None = None, stock: bool = False) -> Outputs:
    """``OpenVINOInferencer.predict(path)`` on every image of ``folder`` (writes ./openvino_cache).

    The plugin's inferencer (float32 unless ``config`` asks otherwise) or, with ``stock``, anomalib's own with
    ``config`` (``None``: its defaults, which compile in bf16 on CPUs with native bf16).
    """
    if stock:
        from anomalib.deploy import OpenVINOInferencer  # noqa: PLC0415
    else:
        from anomalib_fod.inference import OpenVINOInferencer  # noqa: PLC0415

    inferencer = OpenVINOInferencer(path=model_path, device="CPU", config=config)
    outputs = Outputs()
    for path in sorted(folder.iterdir()):
        result = inferencer.predict(path)
        outputs.add(path.name, result.pred_score, result.pred_label, result.anomaly_map)
    return outputs


def onnxruntime_outputs(onnx_path: Path, folder: Path) -> Outputs:
    """ONNX Runtime on every image of ``folder``, read as anomalib's inferencers read it."""
    import onnxruntime  # noqa: PLC0415
    from anomalib.data.utils import read_image  # noqa: PLC0415

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = Outputs()
    for path in sorted(folder.iterdir()):
        image = read_image(path, as_tensor=False).astype(np.float32).transpose(2, 0, 1)[None]
        result = dict(zip(names, session.run(None, {"input": image}), strict=True))
        outputs.add(path.name, result["pred_score"], result["pred_label"], result["anomaly_map"])
    return outputs
