"""Side-by-side benchmark of FOD and anomalib's models (``anomalib-fod benchmark``).

One YAML config lists datasets (anomalib datamodules, validation = test set), models and seeds,
plus the image size, backbone and layers every model shares. Each dataset x model x seed *cell*
runs in its own process (``python -m anomalib_fod.benchmark.cell``): fit, test, predict, exact
metrics on raw scores next to anomalib's own, and cost figures (fit time, throughput, OpenVINO
latency, peak memory, file sizes). Reports: ``results.csv``, ``results.json``, ``results.md``,
``results.png`` in the run folder. Modules:

- :mod:`.config`: YAML schema and the list of cells;
- :mod:`.data`, :mod:`.models`: datamodule and model factories (offline ImageNet weights for
  anomalib's models);
- :mod:`.cell`: one cell (exact metrics from :mod:`anomalib_fod.evaluation`); :mod:`.cost`: timings and memory;
- :mod:`.runner`: resume, subprocesses, progress; :mod:`.report`: tables and chart;
- :mod:`.anomalib_pipeline`: anomalib's own ``benchmark`` pipeline with ``Fod`` registered.
"""

from .config import BenchmarkConfig, BenchmarkConfigError, load_config, parse_config
from .runner import run_benchmark

__all__ = ["BenchmarkConfig", "BenchmarkConfigError", "load_config", "main", "parse_config", "run_benchmark"]


def main(argv: list[str] | None = None) -> int:
    """``anomalib-fod benchmark`` (see :mod:`anomalib_fod.benchmark.__main__`)."""
    from .__main__ import main as cli_main  # noqa: PLC0415

    return cli_main(argv)
