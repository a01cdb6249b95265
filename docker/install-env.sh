#!/bin/sh
# The image's Python environment, in one place: docker/Dockerfile and docker/Dockerfile.cpu run this at
# build time, and `make image-env` runs it on CI into a fresh venv, so what CI checks is what ships.
#
#   sh docker/install-env.sh PYTHON LOCK WHEEL_DIR [image_check.py arguments...]
#
# 1. exactly the pinned runtime environment (requirements/lock.txt, made by `make lock` with uv);
# 2. the repa wheel from WHEEL_DIR with --no-deps (nothing outside the lock is resolved);
# 3. `pip check`, then docker/image_check.py (imports, VAE, encoders, a 2-step CPU train) from the folder
#    this script lies in, run outside any source tree so `import repa` is the installed wheel.
set -eu
PY="$1"
LOCK="$2"
WHEELS="$3"
shift 3
HERE="$(cd "$(dirname "$0")" && pwd)"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the check runs elsewhere
"$PY" -m pip install --no-cache-dir --no-input -r "$LOCK"
"$PY" -m pip install --no-cache-dir --no-input --no-deps "$WHEELS"/repa-*.whl
"$PY" -m pip check
WORK="$(mktemp -d)"
(cd "$WORK" && env -u PYTHONPATH OMP_NUM_THREADS=1 "$PY" "$HERE/image_check.py" "$@")
rm -rf "$WORK"
