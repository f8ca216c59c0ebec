"""Run anomalib's own ``anomalib benchmark`` pipeline with the plugin's models available.

anomalib's pipeline builds each model with ``anomalib.models.get_model``, which accepts only
``class_path: Fod`` / ``anomalib.models.Fod`` (attributes of ``anomalib.models``) or a bare name
(a direct ``AnomalibModule`` subclass): ``anomalib_fod.Fod`` is refused by its module allow-list.
:func:`~anomalib_fod.registry.register_with_anomalib` attaches ``Fod`` to ``anomalib.models``, so a
config with ``class_path: Fod`` works once it has run.

anomalib's ``BenchmarkJob`` creates its ``Engine`` without ``max_epochs`` (Lightning's default is
1000 epochs) and offers no setting for it; Lightning reads trainer defaults from
``PL_TRAINER_<ARGUMENT>`` environment variables, so ``max_epochs`` sets ``PL_TRAINER_MAX_EPOCHS``
while the pipeline runs and restores the variable afterwards. Models that fix their own epochs
(PatchCore, PaDiM: one) keep them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MAX_EPOCHS_VARIABLE = "PL_TRAINER_MAX_EPOCHS"


@contextmanager
def environment_variable(name: str, value: str | None) -> Iterator[None]:
    """Set ``name`` to ``value`` (``None``: leave it as it is) inside the block; restore it afterwards."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def run_anomalib_benchmark(config: str | Path, max_epochs: int | None = None) -> None:
    """Register the plugin, then run ``anomalib.pipelines.Benchmark`` on ``config``.

    anomalib writes its table to ``runs/benchmark/<timestamp>/results.csv`` and its log to
    ``runs/pipeline.log`` (relative to the current directory); failed jobs are only reported there.
    """
    path = Path(config)
    if not path.is_file():
        msg = f"anomalib benchmark config '{path}' does not exist."
        raise FileNotFoundError(msg)
    from anomalib.pipelines import Benchmark  # noqa: PLC0415
    from jsonargparse import Namespace  # noqa: PLC0415

    from anomalib_fod.registry import register_with_anomalib  # noqa: PLC0415

    register_with_anomalib()
    with environment_variable(MAX_EPOCHS_VARIABLE, None if max_epochs is None else str(max_epochs)):
        Benchmark().run(Namespace(config=str(path)))
