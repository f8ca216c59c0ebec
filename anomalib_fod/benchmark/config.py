"""Benchmark configuration: the YAML schema, its validation and the list of cells it describes.

A config names datasets (anomalib datamodule class path + init args), models (class path + init
args + epochs), seeds and the settings every model shares (image size, backbone, layers,
accelerator). One *cell* is one dataset x model x seed. Example (``benchmarks/tiny.yaml``)::

    output_dir: results/benchmarks/tiny      # relative paths: resolved against the current directory
    seeds: [0]
    image_size: [64, 64]
    backbone: tf_efficientnet_lite0
    layers: [blocks.2, blocks.4]
    accelerator: cpu
    openvino: false
    datasets:
      - name: dummy
        class_path: anomalib.data.MVTecAD
        init_args: {root: results/datasets, category: dummy, num_workers: 0}
        dummy: {n_train: 16, size: [64, 64]}   # generate with make_dummy_mvtec when missing
    models:
      - name: Fod
        class_path: anomalib_fod.Fod
        max_epochs: 1
        init_args: {d_models: [32, 64], num_layers: 1}
      - name: Padim
        class_path: anomalib.models.Padim
        init_args: {n_features: 100}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Datamodule arguments the harness owns: validation must be the test set, used only by
# anomalib's post-processor (thresholds, min-max normalisation), never to select a model.
VAL_SPLIT_MODE = "same_as_test"
# Model arguments shared by every model: set them at the top level of the config.
SHARED_MODEL_ARGS = ("backbone", "layers", "pre_trained", "weights_path", "image_size", "pre_processor")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")


class BenchmarkConfigError(ValueError):
    """Raised when a benchmark config is malformed or inconsistent."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: an anomalib datamodule class path and its init args."""

    name: str
    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)
    dummy: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One model: an ``AnomalibModule`` class path, its own init args and epoch budget."""

    name: str
    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)
    max_epochs: int = 1
    timeout_s: float | None = None
    layers: tuple[str, ...] | None = None  # this model's own feature layers (same backbone), else the shared ones
    test_curve: bool = False  # test metrics after every epoch (reporting only; see benchmark/curve.py)


@dataclass(frozen=True)
class BenchmarkConfig:
    """A whole benchmark: datasets x models x seeds plus the shared settings."""

    datasets: tuple[DatasetSpec, ...]
    models: tuple[ModelSpec, ...]
    seeds: tuple[int, ...] = (0,)
    image_size: tuple[int, int] = (256, 256)
    backbone: str = "tf_efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    weights_path: str | None = None
    accelerator: str = "auto"
    output_dir: str = "results/benchmark"
    openvino: bool = True
    openvino_runs: int = 50
    inference_batch_size: int = 32
    inference_max_images: int = 256
    save_maps: bool = False
    isolate_cells: bool = True
    cell_timeout_s: float | None = None


@dataclass(frozen=True)
class CellSpec:
    """Everything one cell needs, JSON-serialisable (it is handed to a subprocess)."""

    index: int
    total: int
    dataset: DatasetSpec
    model: ModelSpec
    seed: int
    image_size: tuple[int, int]
    backbone: str
    layers: tuple[str, ...]
    weights_path: str | None
    accelerator: str
    openvino: bool
    openvino_runs: int
    inference_batch_size: int
    inference_max_images: int
    save_maps: bool
    run_dir: str

    @property
    def cell_id(self) -> str:
        """File-name-safe identifier, e.g. ``bottle__Patchcore__seed0``."""
        return f"{self.dataset.name}__{self.model.name}__seed{self.seed}"

    @property
    def label(self) -> str:
        """Human-readable label, e.g. ``bottle / Patchcore / seed 0``."""
        return f"{self.dataset.name} / {self.model.name} / seed {self.seed}"

    @property
    def result_path(self) -> Path:
        """The cell's result JSON: its existence marks the cell as done."""
        return Path(self.run_dir) / "cells" / f"{self.cell_id}.json"

    @property
    def error_path(self) -> Path:
        """Where a failed cell records its error (a failed cell is retried on the next run)."""
        return Path(self.run_dir) / "cells" / f"{self.cell_id}.error.json"

    @property
    def predictions_path(self) -> Path:
        """Raw predictions (scores, labels, optionally maps) of the cell."""
        return Path(self.run_dir) / "cells" / f"{self.cell_id}.npz"

    @property
    def work_dir(self) -> Path:
        """Scratch folder: engine root (checkpoint), export, log, the spec file."""
        return Path(self.run_dir) / "work" / self.cell_id

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for the subprocess and the result JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellSpec:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["dataset"] = DatasetSpec(**values["dataset"])
        values["model"] = ModelSpec(**values["model"])
        values["image_size"] = tuple(values["image_size"])
        values["layers"] = tuple(values["layers"])
        return cls(**values)

    def fingerprint(self) -> str:
        """Hash of everything that affects the cell's numbers (not its position or folder).

        A finished cell is skipped only when its stored fingerprint matches, so editing a
        model's arguments recomputes that model's cells and nothing else.
        """
        relevant = self.to_dict()
        for key in ("index", "total", "run_dir"):
            relevant.pop(key)
        relevant["model"].pop("timeout_s")
        if relevant["model"].get("layers") is None:  # absent before per-model layers existed
            relevant["model"].pop("layers", None)
        if not relevant["model"].get("test_curve"):  # absent before the curve existed
            relevant["model"].pop("test_curve", None)
        blob = json.dumps(relevant, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchmarkConfigError(message)


def _check_keys(section: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    _require(not unknown, f"{section}: unknown keys {unknown}; allowed: {sorted(allowed)}.")


def _name(section: str, value: object) -> str:
    _require(
        isinstance(value, str) and bool(_NAME_PATTERN.match(value)),
        f"{section}: name must match [A-Za-z0-9_.+-]+, got {value!r}.",
    )
    return str(value)


def _dataset(index: int, data: object) -> DatasetSpec:
    section = f"datasets[{index}]"
    _require(isinstance(data, dict), f"{section} must be a mapping.")
    assert isinstance(data, dict)
    _check_keys(section, data, {"name", "class_path", "init_args", "dummy"})
    _require(isinstance(data.get("class_path"), str), f"{section}.class_path is required (e.g. anomalib.data.MVTecAD).")
    init_args = dict(data.get("init_args") or {})
    mode = init_args.get("val_split_mode", VAL_SPLIT_MODE)
    _require(
        str(getattr(mode, "value", mode)).lower() == VAL_SPLIT_MODE,
        f"{section}.init_args.val_split_mode must be '{VAL_SPLIT_MODE}' (got {mode!r}): the harness never "
        "moves test images into a validation split; validation only feeds anomalib's thresholds/normalisation.",
    )
    init_args["val_split_mode"] = VAL_SPLIT_MODE
    dummy = data.get("dummy")
    if dummy is not None:
        _require(isinstance(dummy, dict), f"{section}.dummy must be a mapping of make_dummy_mvtec arguments.")
        _require(
            init_args.get("root") is not None and init_args.get("category") is not None,
            f"{section}.dummy needs init_args.root and init_args.category (where the data is generated).",
        )
    default_name = str(init_args.get("category") or data["class_path"].rsplit(".", 1)[-1])
    return DatasetSpec(
        name=_name(section, data.get("name", default_name)),
        class_path=data["class_path"],
        init_args=init_args,
        dummy=dict(dummy) if dummy is not None else None,
    )


def _model(index: int, data: object) -> ModelSpec:
    section = f"models[{index}]"
    _require(isinstance(data, dict), f"{section} must be a mapping.")
    assert isinstance(data, dict)
    _check_keys(section, data, {"name", "class_path", "init_args", "max_epochs", "timeout_s", "layers", "test_curve"})
    _require(isinstance(data.get("class_path"), str), f"{section}.class_path is required (e.g. anomalib.models.Padim).")
    init_args = dict(data.get("init_args") or {})
    shared = sorted(set(init_args) & set(SHARED_MODEL_ARGS))
    _require(
        not shared,
        f"{section}.init_args sets {shared}: backbone, layers, weights and image size are shared by every model; "
        "set them at the top level of the config.",
    )
    max_epochs = data.get("max_epochs", 1)
    _require(isinstance(max_epochs, int) and max_epochs >= 1, f"{section}.max_epochs must be an integer >= 1.")
    timeout = data.get("timeout_s")
    _require(timeout is None or (isinstance(timeout, int | float) and timeout > 0), f"{section}.timeout_s must be > 0.")
    name = _name(section, data.get("name", data["class_path"].rsplit(".", 1)[-1]))
    layers = data.get("layers")
    _require(
        layers is None or (isinstance(layers, list) and layers and all(isinstance(v, str) for v in layers)),
        f"{section}.layers must be a list of layer names of the shared backbone.",
    )
    test_curve = data.get("test_curve", False)
    _require(isinstance(test_curve, bool), f"{section}.test_curve must be true or false.")
    return ModelSpec(
        name=name,
        class_path=data["class_path"],
        init_args=init_args,
        max_epochs=max_epochs,
        timeout_s=timeout,
        layers=tuple(layers) if layers else None,
        test_curve=test_curve,
    )


def _image_size(value: object) -> tuple[int, int]:
    sizes = [value] if isinstance(value, int) else value
    _require(
        isinstance(sizes, list | tuple) and len(sizes) in {1, 2} and all(isinstance(v, int) and v >= 32 for v in sizes),
        f"image_size must be one or two integers >= 32, got {value!r}.",
    )
    assert isinstance(sizes, list | tuple)
    return (int(sizes[0]), int(sizes[-1]))


def parse_config(data: dict[str, Any]) -> BenchmarkConfig:
    """Validate a loaded YAML mapping and build a :class:`BenchmarkConfig`."""
    _require(isinstance(data, dict), "the benchmark config must be a YAML mapping.")
    allowed = set(BenchmarkConfig.__dataclass_fields__) | {"name"}
    _check_keys("config", data, allowed)
    datasets = data.get("datasets")
    models = data.get("models")
    _require(isinstance(datasets, list) and len(datasets) > 0, "config.datasets must be a non-empty list.")
    _require(isinstance(models, list) and len(models) > 0, "config.models must be a non-empty list.")
    assert isinstance(datasets, list) and isinstance(models, list)
    dataset_specs = tuple(_dataset(i, d) for i, d in enumerate(datasets))
    model_specs = tuple(_model(i, m) for i, m in enumerate(models))
    for kind, specs in (("dataset", dataset_specs), ("model", model_specs)):
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _require(not duplicates, f"duplicate {kind} names {duplicates}: give each entry a distinct `name`.")
    seeds = data.get("seeds", [0])
    _require(
        isinstance(seeds, list) and len(seeds) > 0 and all(isinstance(s, int) for s in seeds),
        "seeds must be a non-empty list of integers.",
    )
    layers = data.get("layers", list(BenchmarkConfig.layers))
    _require(isinstance(layers, list) and all(isinstance(v, str) for v in layers), "layers must be a list of names.")
    structured = {"name", "datasets", "models", "seeds", "layers", "image_size"}
    options = {k: v for k, v in data.items() if k not in structured}
    for key in ("openvino", "save_maps", "isolate_cells"):
        if key in options:
            _require(isinstance(options[key], bool), f"{key} must be true or false.")
    for key in ("openvino_runs", "inference_batch_size", "inference_max_images"):
        if key in options:
            _require(isinstance(options[key], int) and options[key] >= 1, f"{key} must be an integer >= 1.")
    return BenchmarkConfig(
        datasets=dataset_specs,
        models=model_specs,
        seeds=tuple(seeds),
        image_size=_image_size(data.get("image_size", list(BenchmarkConfig.image_size))),
        layers=tuple(layers),
        **options,
    )


def load_config(path: str | Path) -> BenchmarkConfig:
    """Read and validate a benchmark YAML file."""
    path = Path(path)
    if not path.is_file():
        msg = f"benchmark config '{path}' does not exist."
        raise BenchmarkConfigError(msg)
    with path.open(encoding="utf-8") as file:
        return parse_config(yaml.safe_load(file))


def resolve_path(value: str | Path, base: Path | None = None) -> str:
    """Absolute form of a config path; relative paths are taken from ``base`` (default: the current directory)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return str(path.resolve())


def _resolved_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Dataset with its ``root`` made absolute (cells may run in another working directory)."""
    init_args = dict(spec.init_args)
    if init_args.get("root") is not None:
        init_args["root"] = resolve_path(init_args["root"])
    return DatasetSpec(name=spec.name, class_path=spec.class_path, init_args=init_args, dummy=spec.dummy)


def expand_cells(config: BenchmarkConfig, run_dir: Path) -> list[CellSpec]:
    """All cells in run order: dataset, then model, then seed."""
    combos = [(d, m, s) for d in config.datasets for m in config.models for s in config.seeds]
    return [
        CellSpec(
            index=i + 1,
            total=len(combos),
            dataset=_resolved_dataset(dataset),
            model=model,
            seed=seed,
            image_size=config.image_size,
            backbone=config.backbone,
            layers=model.layers or config.layers,
            weights_path=resolve_path(config.weights_path) if config.weights_path else None,
            accelerator=config.accelerator,
            openvino=config.openvino,
            openvino_runs=config.openvino_runs,
            inference_batch_size=config.inference_batch_size,
            inference_max_images=config.inference_max_images,
            save_maps=config.save_maps,
            run_dir=str(run_dir),
        )
        for i, (dataset, model, seed) in enumerate(combos)
    ]
