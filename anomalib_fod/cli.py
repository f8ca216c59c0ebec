"""``anomalib-fod``: anomalib's CLI with the plugin's models registered.

``anomalib-fod train --model Fod --data ...`` behaves exactly like
``anomalib train --model anomalib_fod.Fod --data ...``.
"""

from __future__ import annotations


def main() -> None:
    """Register the plugin, then hand over to anomalib's CLI."""
    import anomalib_fod  # noqa: F401, PLC0415 - registers the models
    from anomalib.cli.cli import main as anomalib_main  # noqa: PLC0415

    anomalib_main()


if __name__ == "__main__":
    main()
