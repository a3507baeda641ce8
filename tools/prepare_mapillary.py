#!/usr/bin/env python
"""Prepare Mapillary Vistas v1.2 for training: write the 19-class (``<stem>_labelTrainIds.png``) and 7-class
(``<stem>_label7Ids.png``) label files next to every raw ``labels/<stem>.png``, mapping classes by their names in
``config.json``.

    python tools/prepare_mapillary.py [--root $UDA_DATASETS/mapillary] [--splits train val] [--overwrite]

Files that already exist are kept unless ``--overwrite``; every file is written atomically, so an interrupted run
can simply be started again. The expected layout and download links are in datasets/README.md.
"""

import argparse
import sys

from uda_plugins.data.datasets.mapillary import default_root, prepare_mapillary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the training label files of Mapillary Vistas v1.2.")
    parser.add_argument(
        "--root", default=default_root(), help="dataset folder (default: %(default)s, from $UDA_DATASETS)"
    )
    parser.add_argument(
        "--splits", nargs="+", default=["train", "val"], choices=["train", "val"], help="splits to prepare"
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite label files that already exist")
    args = parser.parse_args(argv)
    try:
        written = prepare_mapillary(args.root, splits=args.splits, skip_existing=not args.overwrite)
    except (FileNotFoundError, ValueError, OSError) as e:  # bad input: one line naming the file, no traceback
        print(f"prepare_mapillary.py: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {written} label files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
