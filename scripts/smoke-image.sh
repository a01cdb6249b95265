#!/usr/bin/env bash
# Run the built image as helm/repa runs it, and fail if the Dockerfile and the chart disagree.
#
#   scripts/smoke-image.sh [IMAGE]        (default localhost/repa:<version>; `make image` runs it)
#
# The container gets exactly the chart's settings, read from `helm template` (scripts/chart_pod.py): its
# uid/gid, read-only root, no privilege escalation, all capabilities dropped, and writable only at the
# chart's emptyDir paths (/tmp, the cache); no network. Then:
#   contract  the image's USER is the chart's uid/gid, its ENTRYPOINT is `repa`, every command the chart
#             runs exists in it, every path its ENV points at (HOME's cache, TORCH_HOME, HF_HOME, triton,
#             matplotlib, tempdir) is writable under those settings, and no build leftover (/build, /wheels,
#             a pip configuration) is in it;
#   verbs     `repa --version`, `repa config validate` of a preset, a tiny `repa train` committing a
#             checkpoint on a host folder mounted as the run URL, `repa sample` from it;
#   s3        the same train against a local S3 server (moto) on the loopback of a pod-like network
#             namespace that the container joins (the fsspec/s3fs path from inside the image);
#   exits     SIGTERM during training -> 143, a config error -> 2.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)"
IMAGE="${1:-localhost/repa:$VERSION}"
REPO="${IMAGE%:*}"
PY="${PYTHON:-.venv/bin/python}"
HELM="${HELM:-.venv/bin/helm}"
WORK="$(mktemp -d /tmp/repa-smoke.XXXXXX)"
MOTO_PID=""
cleanup() {
	[ -n "$MOTO_PID" ] && kill "$MOTO_PID" 2> /dev/null || true
	podman rm -f repa-smoke-term > /dev/null 2>&1 || true
	rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf 'smoke: %s\n' "$*"; }
fail() {
	printf 'smoke: FAILED: %s\n' "$*" >&2
	exit 1
}
T0=$SECONDS

# ---- the chart's pod settings ---------------------------------------------------------------------------
"$HELM" template smoke helm/repa -f helm/repa/ci/minimal.yaml --set image.repository="$REPO" --set image.tag="${IMAGE##*:}" \
	> "$WORK/chart.yaml"
eval "$("$PY" scripts/chart_pod.py "$REPO" < "$WORK/chart.yaml")"
say "chart: uid/gid $CHART_UID/$CHART_GID, read-only root $CHART_READ_ONLY_ROOT, no-new-privileges $CHART_NO_NEW_PRIVILEGES," \
	"drop ALL $CHART_DROP_ALL, commands [$CHART_COMMANDS], writable [$CHART_WRITABLE]"
# runc: crun refuses hybrid cgroup layouts; ulimits: the default asks for more than a sandbox grants.
PODMAN=(podman run --rm --runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 --network none)
RUN=("${PODMAN[@]}" --user "$CHART_UID:$CHART_GID" --read-only-tmpfs=false)
[ "$CHART_READ_ONLY_ROOT" = 1 ] && RUN+=(--read-only)
[ "$CHART_NO_NEW_PRIVILEGES" = 1 ] && RUN+=(--security-opt no-new-privileges)
[ "$CHART_DROP_ALL" = 1 ] && RUN+=(--cap-drop ALL)
# An emptyDir is a fresh host folder, group-owned by the pod's fsGroup (podman 4.3's tmpfs ignores mode=).
n=0
for path in $CHART_WRITABLE; do
	n=$((n + 1))
	mkdir -p "$WORK/empty$n"
	chown "0:$CHART_GID" "$WORK/empty$n"
	chmod 2777 "$WORK/empty$n"
	RUN+=(-v "$WORK/empty$n:$path")
done

# ---- contract: Dockerfile vs chart ----------------------------------------------------------------------
user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
[ "$user" = "$CHART_UID:$CHART_GID" ] || fail "the image's USER is '$user', the chart runs as $CHART_UID:$CHART_GID"
entrypoint="$(podman image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")"
[ "$entrypoint" = '["repa"]' ] || fail "the image's ENTRYPOINT is $entrypoint, the chart and docs expect [\"repa\"]"
# Without --user: the image's own user must be the chart's (runAsNonRoot refuses uid 0 and mismatches).
id_out="$("${PODMAN[@]}" --entrypoint id "$IMAGE" -u)"
[ "$id_out" = "$CHART_UID" ] || fail "the container runs as uid $id_out, the chart as $CHART_UID"
for cmd in $CHART_COMMANDS; do
	"${RUN[@]}" --entrypoint sh "$IMAGE" -c "command -v $cmd > /dev/null" || fail "the chart runs '$cmd', which the image lacks"
done
"${RUN[@]}" --entrypoint python "$IMAGE" -c '
import os, sys, tempfile
paths = [os.environ[k] for k in ("XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR")]
bad = []
for p in paths + [tempfile.gettempdir()]:
    try:
        os.makedirs(p, exist_ok=True)
        with open(os.path.join(p, ".w"), "w") as f:
            f.write("x")
    except OSError as e:
        bad.append(f"{p}: {e.strerror}")
try:
    open("/repa-root-write", "w")
    bad.append("/ is writable: the root filesystem is not read-only")
except OSError:
    pass
sys.exit("; ".join(bad) or None)
' || fail "a path the image's ENV names is not writable under the chart's mounts (above)"
"${RUN[@]}" --entrypoint sh "$IMAGE" -c '
for p in /build /wheels /src /etc/pip.conf /etc/xdg/pip /run/repa-build /root/.cache/pip /root/.config/pip; do
	[ -e "$p" ] && { echo "leftover in the image: $p"; exit 1; }
done; exit 0' || fail "build leftovers in the image"
say "contract ok: USER $user, ENTRYPOINT $entrypoint, chart commands present, ENV paths writable, no leftovers"

# ---- verbs on a local folder ----------------------------------------------------------------------------
SETS=(model.hidden_size=32 model.depth=2 model.num_heads=2 model.encoder_depth=1 model.projector_dim=32
	model.num_classes=10 "encoder.model_kwargs=[{img_size: 16, patch_size: 2, embed_dim: 32, depth: 1, num_heads: 2}]"
	data.resolution=16 data.chunk_size=2 data.shards_in_flight=2 train.global_batch_size=4 log.every_steps=1
	log.sample_every_steps=1000 checkpoint.every_steps=2 data.url=file:///data)
set_args() { for s in "${SETS[@]}" "$@"; do printf '%s\0%s\0' --set "$s"; done; }
mapfile -d '' TRAIN < <(set_args train.max_steps=2)

mkdir -p "$WORK/data" "$WORK/runs"
PYTHONPATH="$PWD" "$PY" - "$WORK" << 'EOF'
import sys
from pathlib import Path

import numpy as np

from repa import synthetic
from repa.data.prepare import prepare_images, prepare_latents

work = Path(sys.argv[1])
rng = np.random.default_rng(0)
labels = np.arange(20) % 10
images = np.stack([synthetic.draw_shape(int(c), 16, rng)[0] for c in labels])
synthetic.write_image_tree(work / "images", images, labels)
prepare_images(str(work / "images"), f"file://{work}/data", resolution=16, samples_per_shard=8)
prepare_latents(f"file://{work}/data", vae="none", batch_size=8)
EOF
chown -R "$CHART_UID:$CHART_GID" "$WORK/runs"
VOL=(-v "$WORK/data:/data:ro" -v "$WORK/runs:/runs")

"${RUN[@]}" "$IMAGE" --version || fail "repa --version"
"${RUN[@]}" "$IMAGE" config validate --config sit-b-2-repa || fail "repa config validate --config sit-b-2-repa"
t=$SECONDS
"${RUN[@]}" "${VOL[@]}" "$IMAGE" train --config toy-cpu "${TRAIN[@]}" --set storage.run_url=file:///runs/local \
	|| fail "repa train (local folder)"
ls "$WORK"/runs/local/checkpoints/step-0000002/ > /dev/null || fail "repa train committed no checkpoint at step 2"
say "train ok: committed $(ls "$WORK/runs/local/checkpoints") ($((SECONDS - t)) s)"
t=$SECONDS
"${RUN[@]}" "${VOL[@]}" "$IMAGE" sample --config toy-cpu "${TRAIN[@]}" --set storage.run_url=file:///runs/local \
	--set sample.num_samples=4 --set sample.num_steps=2 --set sample.batch_size_per_device=4 --no-progress \
	--output file:///runs/local/samples || fail "repa sample"
n="$(find "$WORK/runs/local/samples" -type f | wc -l)"
[ "$n" -gt 0 ] || fail "repa sample wrote nothing"
say "sample ok: $n files under samples/ ($((SECONDS - t)) s)"

# ---- S3 (moto) on the loopback of a network namespace the container joins ------------------------------
MOTO="$(dirname "$PY")/moto_server"
unshare --net sh -c 'ip link set lo up && exec "$0" -H 127.0.0.1 -p 5555' "$MOTO" > "$WORK/moto.log" 2>&1 &
MOTO_PID=$!
NETNS="/proc/$MOTO_PID/ns/net"
S3ENV=(-e AWS_ENDPOINT_URL_S3=http://127.0.0.1:5555 -e AWS_ACCESS_KEY_ID=smoke -e AWS_SECRET_ACCESS_KEY=smoke
	-e AWS_DEFAULT_REGION=us-east-1)
for _ in $(seq 50); do
	nsenter --net="$NETNS" "$PY" -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:5555")' 2> /dev/null && break
	sleep 0.2
done
AWS_ENDPOINT_URL_S3=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke AWS_DEFAULT_REGION=us-east-1 \
	nsenter --net="$NETNS" "$PY" -c '
import sys, s3fs
fs = s3fs.S3FileSystem()
fs.mkdir("smoke")
fs.put(sys.argv[1] + "/", "smoke/data/", recursive=True)
' "$WORK/data" || { cat "$WORK/moto.log" >&2; fail "could not stage the data in the local S3 server"; }
t=$SECONDS
S3RUN=()
for a in "${RUN[@]}"; do
	[ "$a" = none ] && [ "${S3RUN[-1]}" = --network ] && a="ns:$NETNS"
	S3RUN+=("$a")
done
"${S3RUN[@]}" "${S3ENV[@]}" "$IMAGE" train --config toy-cpu "${TRAIN[@]}" --set data.url=s3://smoke/data \
	--set storage.run_url=s3://smoke/run || fail "repa train against S3"
AWS_ENDPOINT_URL_S3=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke AWS_DEFAULT_REGION=us-east-1 \
	nsenter --net="$NETNS" "$PY" -c '
import s3fs
names = s3fs.S3FileSystem().ls("smoke/run/checkpoints")
assert any(n.endswith("step-0000002") for n in names), names
' || fail "repa train against S3 committed no checkpoint at step 2"
say "s3 ok: train read s3://smoke/data and committed s3://smoke/run/checkpoints/step-0000002 ($((SECONDS - t)) s)"

# ---- exit codes: SIGTERM -> 143, config error -> 2 -----------------------------------------------------
mapfile -d '' LONG < <(set_args train.max_steps=100000 checkpoint.every_steps=100000)
"${RUN[@]/--rm/--name=repa-smoke-term}" "${VOL[@]}" "$IMAGE" train --config toy-cpu "${LONG[@]}" \
	--set storage.run_url=file:///runs/term > "$WORK/term.log" 2>&1 &
for _ in $(seq 240); do
	grep -Eq 'step +[0-9]+ of' "$WORK/term.log" 2> /dev/null && break # training has started
	sleep 0.5
done
sleep 2
podman kill --signal TERM repa-smoke-term > /dev/null
code="$(podman wait repa-smoke-term)"
podman rm -f repa-smoke-term > /dev/null
[ "$code" = 143 ] || { tail -n 20 "$WORK/term.log" >&2; fail "SIGTERM during repa train exited $code, not 143"; }
say "SIGTERM during train: exit $code ($(grep -o 'committed[^"]*' "$WORK/term.log" | tail -n1))"
set +e
"${RUN[@]}" "$IMAGE" train --config nope > "$WORK/err.log" 2>&1
code=$?
set -e
[ "$code" = 2 ] || { cat "$WORK/err.log" >&2; fail "a config error exited $code, not 2"; }
say "config error: exit $code: $(head -n1 "$WORK/err.log")"
say "all passed ($((SECONDS - T0)) s)"
