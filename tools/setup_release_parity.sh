#!/usr/bin/env bash
# Build, outside this repository, what the release-parity tests (tests/test_release_parity.py) need to run
# lhoyer/MIC's own mmseg code: the release's seg/ folder and a --target folder with the pure-Python mmcv 1.7.2
# (MMCV_WITH_OPS=0), kornia 0.5.8 (the release's pin) and mmcv's small dependencies. Nothing is installed into the
# current environment; torch, timm, numpy, opencv and matplotlib come from it.
#
#   tools/setup_release_parity.sh DEST [MIC]
#
# DEST: an empty or new folder outside the repository. MIC: a lhoyer/MIC git checkout or bare git directory
# (default: clone https://github.com/lhoyer/MIC). The release is exported at commit 2f932a9, the one the audits in
# docs/release-audit/ cite. Prints the two exports that turn the tests on.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 DEST [MIC checkout or git dir]" >&2
    exit 2
fi
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
case "$DEST/" in
    "$REPO"/*) echo "DEST must be outside the repository ($REPO)" >&2; exit 2 ;;
esac
COMMIT=2f932a9
PY=${PYTHON:-python3}

if [ $# -ge 2 ]; then
    GIT_DIR_OF_MIC=$(cd "$2" && if [ -d .git ]; then echo "$PWD/.git"; else echo "$PWD"; fi)
else
    git clone --quiet https://github.com/lhoyer/MIC "$DEST/MIC.git" --bare
    GIT_DIR_OF_MIC="$DEST/MIC.git"
fi
mkdir -p "$DEST/mic"
git --git-dir="$GIT_DIR_OF_MIC" archive "$COMMIT" seg/mmseg seg/configs | tar -x -C "$DEST/mic"

# mmcv 1.7.2's setup.py imports pkg_resources, which recent setuptools no longer ship: build it with an older
# setuptools on PYTHONPATH (an absolute path: pip runs setup.py from a temporary folder) and no build isolation.
"$PY" -m pip install --quiet --target "$DEST/buildtools" "setuptools<70" wheel
PYTHONPATH="$DEST/buildtools" MMCV_WITH_OPS=0 "$PY" -m pip install --quiet --no-deps --no-build-isolation \
    --target "$DEST/site" mmcv==1.7.2
"$PY" -m pip install --quiet --no-deps --target "$DEST/site" kornia==0.5.8 addict yapf==0.40.1 \
    importlib_metadata==6.8.0 zipp platformdirs tomli prettytable wcwidth
rm -rf "$DEST/buildtools"

echo "export UDA_RELEASE_MIC=$DEST/mic/seg"
echo "export UDA_RELEASE_SITE=$DEST/site"
