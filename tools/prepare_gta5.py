#!/usr/bin/env python
"""Prepare GTA5 for training: write the 19-class (``labels/XXXXX_labelTrainIds.png``) and 7-class
(``labels/XXXXX_label7Ids.png``) label files next to every raw ``labels/XXXXX.png``.

    python tools/prepare_gta5.py [--root $UDA_DATASETS/gta5] [--overwrite]

Files that already exist are kept unless ``--overwrite``; every file is written atomically, so an interrupted run
can simply be started again. The expected layout and download links are in datasets/README.md.
"""

import argparse
import sys

from uda_plugins.data.datasets.gta5 import default_root, prepare_gta5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the training label files of GTA5.")
    parser.add_argument(
        "--root", default=default_root(), help="dataset folder (default: %(default)s, from $UDA_DATASETS)"
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite label files that already exist")
    args = parser.parse_args(argv)
    try:
        written = prepare_gta5(args.root, skip_existing=not args.overwrite)
    except (FileNotFoundError, ValueError, OSError) as e:  # bad input: one line naming the file, no traceback
        print(f"prepare_gta5.py: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {written} label files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
