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
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from anomalib_fod.utils import as_image_size

# Datamodule arguments the harness owns: validation must be the test set, used only by
# anomalib's post-processor (thresholds, min-max normalisation), never to select a model.
VAL_SPLIT_MODE = "same_as_test"
# Model arguments shared by every model: set them at the top level of the config.
SHARED_MODEL_ARGS = ("backbone", "layers", "pre_trained", "weights_path", "image_size", "pre_processor")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")


class BenchmarkConfigError(ValueError):
    """Raised when a benchmark config is malformed or inconsistent."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchmarkConfigError(message)


def _checked_name(section: str, value: str) -> str:
    _require(bool(_NAME_PATTERN.match(value)), f"{section}: name must match [A-Za-z0-9_.+-]+, got {value!r}.")
    return value


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: an anomalib datamodule class path and its init args.

    Attributes:
        class_path: datamodule class, e.g. ``anomalib.data.MVTecAD``.
        name: name in reports (default: the category, else the class name).
        init_args: the datamodule's arguments; ``val_split_mode`` is always ``same_as_test``.
        dummy: ``make_dummy_mvtec`` arguments: generate the data at ``root/category`` when missing.
    """

    class_path: str
    name: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    dummy: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        init_args = dict(self.init_args)
        mode = init_args.get("val_split_mode", VAL_SPLIT_MODE)
        _require(
            str(getattr(mode, "value", mode)).lower() == VAL_SPLIT_MODE,
            f"datasets: init_args.val_split_mode must be '{VAL_SPLIT_MODE}' (got {mode!r}): the harness never "
            "moves test images into a validation split; validation only feeds anomalib's thresholds/normalisation.",
        )
        init_args["val_split_mode"] = VAL_SPLIT_MODE
        _require(
            self.dummy is None or (init_args.get("root") is not None and init_args.get("category") is not None),
            "datasets: dummy needs init_args.root and init_args.category (where the data is generated).",
        )
        name = self.name or str(init_args.get("category") or self.class_path.rsplit(".", 1)[-1])
        object.__setattr__(self, "init_args", init_args)
        object.__setattr__(self, "name", _checked_name("datasets", name))


@dataclass(frozen=True)
class ModelSpec:
    """One model: an ``AnomalibModule`` class path, its own init args and epoch budget.

    Attributes:
        class_path: model class, e.g. ``anomalib.models.Patchcore``.
        name: name in reports (default: the class name).
        init_args: the model's own arguments (the shared ones are set at the top level).
        max_epochs: training epochs.
        timeout_s: kill the cell after this many seconds.
        layers: this model's own feature layers (same backbone), else the shared ones.
        test_curve: test metrics after every epoch (reporting only; see benchmark/curve.py).
        train_batch_size: this model's training batch, instead of the dataset's ``train_batch_size`` (e.g. a
            model that learns per step at batch 1 beside one whose recipe trains at batch 16).
    """

    class_path: str
    name: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    max_epochs: int = 1
    timeout_s: float | None = None
    layers: tuple[str, ...] | None = None
    test_curve: bool = False
    train_batch_size: int | None = None

    def __post_init__(self) -> None:
        shared = sorted(set(self.init_args) & set(SHARED_MODEL_ARGS))
        _require(
            not shared,
            f"models: init_args sets {shared}: backbone, layers, weights and image size are shared by every model; "
            "set them at the top level of the config.",
        )
        _require(self.max_epochs >= 1, "models: max_epochs must be an integer >= 1.")
        _require(self.timeout_s is None or self.timeout_s > 0, "models: timeout_s must be > 0.")
        _require(self.layers is None or len(self.layers) > 0, "models: layers must name layers of the shared backbone.")
        _require(
            self.train_batch_size is None or (isinstance(self.train_batch_size, int) and self.train_batch_size >= 1),
            "models: train_batch_size must be an integer >= 1 (or absent: the dataset's).",
        )
        object.__setattr__(self, "init_args", dict(self.init_args))
        object.__setattr__(self, "layers", tuple(self.layers) if self.layers else None)
        object.__setattr__(self, "name", _checked_name("models", self.name or self.class_path.rsplit(".", 1)[-1]))


@dataclass(frozen=True, kw_only=True)
class CellSettings:
    """The settings every cell of a benchmark shares (top-level keys of the config, copied into each cell).

    A new setting is one field here: the config accepts it, every cell receives it, and the
    fingerprints of cells computed before it existed stay valid while it keeps its default.

    Attributes:
        image_size: ``[height, width]`` (or one int) of every model's input.
        backbone: timm CNN every model uses.
        layers: its feature layers (a model may set its own).
        weights_path: local ImageNet weights of the backbone (offline).
        accelerator: Lightning accelerator.
        openvino: export to OpenVINO and time its batch-1 latency.
        openvino_runs: timed OpenVINO runs.
        inference_batch_size: batch of the torch throughput measurement.
        inference_max_images: test images timed at most.
        save_maps: keep the raw anomaly maps with the predictions.
    """

    image_size: int | tuple[int, int] = (256, 256)
    backbone: str = "tf_efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    weights_path: str | None = None
    accelerator: str = "auto"
    openvino: bool = True
    openvino_runs: int = 50
    inference_batch_size: int = 32
    inference_max_images: int = 256
    save_maps: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "image_size", as_image_size(self.image_size))
        except ValueError as error:
            raise BenchmarkConfigError(str(error)) from error
        object.__setattr__(self, "layers", tuple(self.layers))
        for key in ("openvino_runs", "inference_batch_size", "inference_max_images"):
            _require(getattr(self, key) >= 1, f"{key} must be an integer >= 1.")


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig(CellSettings):
    """A whole benchmark: datasets x models x seeds plus the settings every cell shares.

    Attributes:
        datasets: the datasets (at least one).
        models: the models (at least one).
        seeds: one cell per dataset, model and seed.
        output_dir: run folder (relative: to the current directory).
        isolate_cells: run each cell in its own process (its peak memory is then its own).
        cell_timeout_s: default per-cell timeout.
        name: the benchmark's name (for the reader; not used).
    """

    datasets: tuple[DatasetSpec, ...]
    models: tuple[ModelSpec, ...]
    seeds: tuple[int, ...] = (0,)
    output_dir: str = "results/benchmark"
    isolate_cells: bool = True
    cell_timeout_s: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(len(self.datasets) > 0, "config.datasets must be a non-empty list.")
        _require(len(self.models) > 0, "config.models must be a non-empty list.")
        _require(len(self.seeds) > 0, "seeds must be a non-empty list of integers.")
        for kind, specs in (("dataset", self.datasets), ("model", self.models)):
            names = [s.name for s in specs]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            _require(not duplicates, f"duplicate {kind} names {duplicates}: give each entry a distinct `name`.")


@dataclass(frozen=True, kw_only=True)
class CellSpec(CellSettings):
    """Everything one cell needs, JSON-serialisable (it is handed to a subprocess)."""

    index: int
    total: int
    dataset: DatasetSpec
    model: ModelSpec
    seed: int
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
        return cls(**values)

    def fingerprint(self) -> str:
        """Hash of everything that affects the cell's numbers (not its position, folder or timeout).

        A finished cell is skipped only when its stored fingerprint matches, so editing a
        model's arguments recomputes that model's cells and nothing else. Settings added after the
        first results were stored count only when they differ from their default, so adding one
        does not invalidate earlier results.
        """
        relevant = _fingerprinted(self, _CELL_FIELDS, exclude={"index", "total", "run_dir"})
        relevant["dataset"] = _fingerprinted(self.dataset, _DATASET_FIELDS)
        relevant["model"] = _fingerprinted(self.model, _MODEL_FIELDS, exclude={"timeout_s"})
        blob = json.dumps(relevant, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Fields every fingerprint has held since the harness's first results; later ones count only off their default.
_CELL_FIELDS = frozenset(
    {
        *("dataset", "model", "seed", "image_size", "backbone", "layers", "weights_path", "accelerator"),
        *("openvino", "openvino_runs", "inference_batch_size", "inference_max_images", "save_maps"),
    }
)
_DATASET_FIELDS = frozenset({"name", "class_path", "init_args", "dummy"})
_MODEL_FIELDS = frozenset({"name", "class_path", "init_args", "max_epochs"})


def _fingerprinted(spec: Any, always: frozenset[str], exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:  # noqa: ANN401
    """``spec``'s fields as plain data, without ``exclude`` and without fields not in ``always`` at their default."""
    result = {}
    for item in fields(spec):
        value = getattr(spec, item.name)
        if item.name in exclude:
            continue
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        if item.name not in always and value == default:
            continue
        result[item.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return json.loads(json.dumps(result, default=str))  # tuples as lists, as the stored fingerprints had them


def _section_parser(spec: type, skip: set[str] | None = None) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(spec, as_group=False, skip=skip)
    return parser


def _parse_section(parser: ArgumentParser, section: str, data: object) -> dict[str, Any]:
    _require(isinstance(data, dict), f"{section} must be a mapping.")
    try:
        return parser.parse_object(data).as_dict()
    except Exception as error:  # jsonargparse's ArgumentError: the key and the expected type
        raise BenchmarkConfigError(f"{section}: {error}") from error


def parse_config(data: dict[str, Any]) -> BenchmarkConfig:
    """Validate a loaded YAML mapping (types by jsonargparse, consistency by the dataclasses)."""
    # Entries hold class_path/init_args keys, which jsonargparse would take for a class to instantiate
    # if they were parsed as typed values: each list entry is parsed as a config of its own instead.
    top = _section_parser(BenchmarkConfig, skip={"datasets", "models"})
    top.add_argument("--datasets", type=list[dict[str, Any]], required=True)
    top.add_argument("--models", type=list[dict[str, Any]], required=True)
    values = _parse_section(top, "config", data)
    dataset_parser, model_parser = _section_parser(DatasetSpec), _section_parser(ModelSpec)
    values["datasets"] = tuple(
        DatasetSpec(**_parse_section(dataset_parser, f"datasets[{i}]", entry)) for i, entry in enumerate(values["datasets"])
    )
    values["models"] = tuple(
        ModelSpec(**_parse_section(model_parser, f"models[{i}]", entry)) for i, entry in enumerate(values["models"])
    )
    return BenchmarkConfig(**values)


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
    return replace(spec, init_args=init_args)


def expand_cells(config: BenchmarkConfig, run_dir: Path) -> list[CellSpec]:
    """All cells in run order: dataset, then model, then seed."""
    shared = {item.name: getattr(config, item.name) for item in fields(CellSettings)}
    shared["weights_path"] = resolve_path(config.weights_path) if config.weights_path else None
    combos = [(d, m, s) for d in config.datasets for m in config.models for s in config.seeds]
    return [
        CellSpec(
            **{**shared, "layers": model.layers or config.layers},
            index=i + 1,
            total=len(combos),
            dataset=_resolved_dataset(dataset),
            model=model,
            seed=seed,
            run_dir=str(run_dir),
        )
        for i, (dataset, model, seed) in enumerate(combos)
    ]
