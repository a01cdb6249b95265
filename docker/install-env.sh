#!/bin/sh
# The image's Python environment, in one place: docker/Dockerfile runs this at build time in two layers
# (`lock`, then `package`), and `make image-env` runs both into a fresh venv where no container engine is.
#
#   sh docker/install-env.sh lock PYTHON LOCK
#   sh docker/install-env.sh package PYTHON WHEEL_DIR [image_check.py arguments...]
#
# lock:    exactly the pinned runtime environment (requirements/lock.txt, made by `make lock` with uv);
# package: the repa wheel from WHEEL_DIR with --no-deps (nothing outside the lock is resolved), `pip check`,
#          then docker/image_check.py (imports, VAE, encoders, a 2-step CPU train) from the folder this
#          script lies in, run outside any source tree so `import repa` is the installed wheel.
set -eu
STEP="$1"
PY="$2"
shift 2
case "$STEP" in
lock)
	"$PY" -m pip install --no-cache-dir --no-input -r "$1"
	;;
package)
	WHEELS="$1"
	shift
	HERE="$(cd "$(dirname "$0")" && pwd)"
	case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac # the check runs elsewhere
	"$PY" -m pip install --no-cache-dir --no-input --no-deps "$WHEELS"/repa-*.whl
	"$PY" -m pip check
	WORK="$(mktemp -d)"
	(cd "$WORK" && env -u PYTHONPATH OMP_NUM_THREADS=1 "$PY" "$HERE/image_check.py" "$@")
	rm -rf "$WORK"
	;;
*)
	echo "install-env.sh: unknown step '$STEP' (lock or package)" >&2
	exit 2
	;;
esac
