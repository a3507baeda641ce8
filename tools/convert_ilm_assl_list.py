#!/usr/bin/env python
"""Split one of ILM-ASSL's labelled lists into this project's source and target image lists.

    python tools/convert_ilm_assl_list.py <ILM-ASSL>/data/gtav2cityscapes/2.2%/labeled.txt \\
        --source-out datasets/lists/ilm_assl/gtav2cityscapes/source_2000.txt \\
        --target-out datasets/lists/ilm_assl/gtav2cityscapes/labeled_2.2pct.txt

The authors copy GTA5 and SYNTHIA into the Cityscapes tree under renamed files (``core/dataset/rename.py``:
``leftImg8bit/train/gta5/gta5_<stem>_000019_leftImg8bit.png``, ``.../synthia/synthia_<stem>_..._leftImg8bit.png``)
and list them beside the labelled Cityscapes images. This writes the source lines back under their own names
(``images/<stem>.png`` for GTA5, ``RGB/<stem>.png`` for SYNTHIA: ``DATASETS.SOURCE_LIST``) and the Cityscapes lines
as they are (``DATASETS.TARGET_LABELED_LIST``); both read like any list (a line matches the image whose path ends
with it).
"""

import argparse
import os
import re
import sys
from typing import List, Tuple

_RENAMED = re.compile(r"(?:^|/)(gta5|synthia)/(?:gta5|synthia)_(.+)_000019_leftImg8bit\.png$")
_FOLDER = {"gta5": "images", "synthia": "RGB"}


def split_list(lines: List[str]) -> Tuple[List[str], List[str]]:
    """(source lines under their own names, target lines) of an ILM-ASSL list."""
    source, target = [], []
    for line in (raw.strip() for raw in lines):
        if not line:
            continue
        match = _RENAMED.search(line)
        if match:
            source.append(f"{_FOLDER[match.group(1)]}/{match.group(2)}.png")
        else:
            target.append(line)
    return source, target


def _write(path: str, lines: List[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("list", help="an ILM-ASSL labeled.txt")
    parser.add_argument("--source-out", required=True)
    parser.add_argument("--target-out", required=True)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.list):
        print(f"convert_ilm_assl_list.py: error: '{args.list}' does not exist", file=sys.stderr)
        return 1
    with open(args.list) as f:
        source, target = split_list(f.readlines())
    _write(args.source_out, source)
    _write(args.target_out, target)
    print(f"{len(source)} source images -> {args.source_out}; {len(target)} target images -> {args.target_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
