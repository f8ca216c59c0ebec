"""Build a dataset's anomalib datamodule for one cell (validation = the test set)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from .config import VAL_SPLIT_MODE, DatasetSpec
from .models import import_class


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset folder is missing (anomalib would try to download it)."""


def check_dataset_present(init_args: dict[str, Any]) -> None:
    """Fail early when ``root`` (or ``root/category``) is missing.

    anomalib's MVTec-style datamodules download a missing category in ``prepare_data``; on an
    offline machine that fails late and obscurely, and online it silently fetches gigabytes.
    """
    root = init_args.get("root")
    if root is None:
        return
    folder = Path(root) / str(init_args["category"]) if init_args.get("category") else Path(root)
    if not folder.is_dir():
        msg = (
            f"dataset folder '{folder}' does not exist (relative roots in a benchmark config are resolved "
            "against the directory the benchmark is started from)."
        )
        raise DatasetNotFoundError(msg)


def ensure_dummy_dataset(spec: DatasetSpec) -> bool:
    """Generate ``spec``'s synthetic data (``dummy:`` in the config) if its folder is missing.

    Returns:
        Whether data was generated.
    """
    if spec.dummy is None:
        return False
    folder = Path(spec.init_args["root"]) / str(spec.init_args["category"])
    if folder.is_dir():
        return False
    from anomalib_fod.data.dummy import make_dummy_mvtec  # noqa: PLC0415

    arguments = dict(spec.dummy)
    if "size" in arguments:
        arguments["size"] = tuple(arguments["size"])
    make_dummy_mvtec(spec.init_args["root"], category=str(spec.init_args["category"]), **arguments)
    return True


def build_datamodule(spec: DatasetSpec, train_batch_size: int | None = None) -> Any:  # noqa: ANN401 - an AnomalibDataModule
    """Instantiate the datamodule of ``spec`` with ``val_split_mode='same_as_test'`` (and ``train_batch_size``,
    when given, instead of the dataset's).

    The test set is never used to select a model: the validation split equals the test set
    only so that anomalib's post-processor can compute its thresholds and min-max statistics,
    which affect anomalib's own (post-processed) metrics but not the harness's exact metrics.
    """
    from anomalib.data import AnomalibDataModule  # noqa: PLC0415

    datamodule_class = import_class(spec.class_path)
    if not (isinstance(datamodule_class, type) and issubclass(datamodule_class, AnomalibDataModule)):
        msg = f"'{spec.class_path}' is not an anomalib AnomalibDataModule."
        raise TypeError(msg)
    init_args = dict(spec.init_args)
    if train_batch_size is not None:
        init_args["train_batch_size"] = train_batch_size
    if "val_split_mode" not in inspect.signature(datamodule_class.__init__).parameters:
        init_args.pop("val_split_mode", None)
    else:
        init_args["val_split_mode"] = VAL_SPLIT_MODE
    check_dataset_present(init_args)
    return datamodule_class(**init_args)
