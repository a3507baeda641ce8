#!/usr/bin/env python
"""Prepare SYNTHIA-RAND-CITYSCAPES for training: write the 19-class label file
``GT/LABELS/XXXXXXX_labelTrainIds.png`` next to every raw ``GT/LABELS/XXXXXXX.png``.

    python tools/prepare_synthia.py [--root $UDA_DATASETS/synthia] [--overwrite]

Files that already exist are kept unless ``--overwrite``; every file is written atomically, so an interrupted run
can simply be started again. The expected layout and download links are in datasets/README.md.
"""

import argparse
import sys

from uda_plugins.data.datasets.synthia import default_root, prepare_synthia


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the training label files of SYNTHIA-RAND-CITYSCAPES.")
    parser.add_argument(
        "--root", default=default_root(), help="dataset folder (default: %(default)s, from $UDA_DATASETS)"
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite label files that already exist")
    args = parser.parse_args(argv)
    try:
        written = prepare_synthia(args.root, skip_existing=not args.overwrite)
    except (FileNotFoundError, ValueError, OSError) as e:  # bad input: one line naming the file, no traceback
        print(f"prepare_synthia.py: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {written} label files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
