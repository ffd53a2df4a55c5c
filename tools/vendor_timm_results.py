"""Vendor the rows of timm's published ImageNet results that the catalog's timm entries use.

Usage: python tools/vendor_timm_results.py [PATH/TO/results-imagenet.csv]

Reads timm's ``results/results-imagenet.csv`` (default: ``/work/shared/reference/timm/results-imagenet.csv``),
picks each entry's row at its evaluation resolution (see :mod:`edgetl.zoo.timm`) and writes them, with a
provenance line, to ``edgetl/zoo/timm_results.csv``. Run it after upgrading timm, then rebuild the catalog.
"""

from __future__ import annotations

import sys

from edgetl.zoo import timm as zoo_timm

DEFAULT_SOURCE = "/work/shared/reference/timm/results-imagenet.csv"


def main(argv: list[str]) -> int:
    """Write the vendored results file and print how many rows it holds."""
    source = argv[0] if argv else DEFAULT_SOURCE
    chosen = zoo_timm.entries(zoo_timm.read_results(source))
    dest = zoo_timm.write_vendored_results(source, [(e.hub_id, e.resolution) for e in chosen])
    print(f"{len(chosen)} rows of {source} written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
