"""``anomalib-fod``: anomalib's CLI with the plugin's models registered, plus a few commands.

- ``anomalib-fod train|test|export|predict ... --model Fod`` behaves exactly like
  ``anomalib ... --model anomalib_fod.Fod`` (anomalib's own CLI after registering the plugin).
- ``anomalib-fod demo``: train and test FOD offline on the embedded dataset
  (:mod:`anomalib_fod.demo`).
- ``anomalib-fod predict-folder --model model.xml --input DIR --output OUT``: run an exported
  OpenVINO model over a folder (:mod:`anomalib_fod.deploy`).
- ``anomalib-fod explain --checkpoint model.ckpt --image IMG [IMG ...] --output OUT``: the paper's
  qualitative figure per image (:mod:`anomalib_fod.explain`).
"""

from __future__ import annotations

import importlib
import sys

# Commands of the plugin itself: name -> module with a ``main(argv)``.
PLUGIN_COMMANDS = {
    "demo": "anomalib_fod.demo",
    "predict-folder": "anomalib_fod.deploy",
    "benchmark": "anomalib_fod.benchmark",
    "explain": "anomalib_fod.explain",
}


def main() -> None:
    """Run a plugin command, or register the plugin and hand over to anomalib's CLI."""
    if len(sys.argv) > 1 and sys.argv[1] in PLUGIN_COMMANDS:
        command = importlib.import_module(PLUGIN_COMMANDS[sys.argv[1]])
        sys.exit(command.main(sys.argv[2:]))

    import anomalib_fod  # noqa: F401, PLC0415 - registers the models
    from anomalib.cli.cli import main as anomalib_main  # noqa: PLC0415

    anomalib_main()


if __name__ == "__main__":
    main()
