#!/usr/bin/env bash
# `make image`: build docker/Dockerfile with a real OCI builder (buildah, else `podman build`) into
# localhost/repa:<version>, then smoke-run it as the chart runs it (scripts/smoke-image.sh).
#
#   scripts/build-image.sh [--no-smoke]
#
# Settings, and why each is needed (measured on Debian 12 with buildah 1.28 / podman 4.3, docs/kubernetes.md):
# - Base: the Dockerfile's python:3.11.13-slim-bookworm, pulled and pinned by digest (its FROM lines are
#   rewritten to python@sha256:...; REPA_BASE_IMAGE=... names another) when a registry answers. Where
#   none does (CI, sandboxes), a stand-in is made once with `debootstrap --variant=minbase bookworm` +
#   Debian's python3.11 (3.11.2), pip and venv, and the output says "built on a stand-in base, not the
#   release base".
# - Runtime runc: crun 1.8 refuses hybrid cgroup layouts ("cgroups in hybrid mode not supported").
# - --ulimit nofile/nproc: the default asks for more open files than a sandbox without CAP_SYS_RESOURCE may.
# - The host's pip configuration (`pip config list`: index, extra indexes, find-links, constraints) and its
#   CA bundle (the system trust store, for a TLS-intercepting proxy) are bind-mounted read-only under
#   /run/repa-build into the environment's RUN step (`--volume`, PIP_CONFIG_FILE), never COPYed: no layer
#   holds them, and the final stage removes the empty mount points. Local paths they name (file://
#   indexes, wheel folders) are mounted there too. Nothing host-specific is written in the repository.
# - No --layers: buildah 1.28's layer cache reuses a cached stage after a code change (buildah #4375,
#   #4522, #6609). Instead this script caches the locked environment ITSELF, as an image tagged with the
#   sha256 of everything that stage reads (the Dockerfile's env stage, requirements/lock.txt,
#   docker/install-env.sh, the base image's id): a code change rebuilds only the small top layer (the repa
#   wheel + docker/image_check.py) and every node keeps the multi-GB environment layer it already has.
# - One image: the CPU image would install the same lock (torch's CUDA build runs on the CPU), so it is the
#   same image; there is no second Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=1
[ "${1:-}" = "--no-smoke" ] && SMOKE=0
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)"
IMAGE="${REPA_IMAGE:-localhost/repa:$VERSION}"
RELEASE_BASE="$(sed -n 's/^FROM \(python:[^ ]*\) AS env$/\1/p' docker/Dockerfile)"
[ -n "$RELEASE_BASE" ] || { echo "make image: docker/Dockerfile has no 'FROM python:... AS env' line" >&2; exit 1; }
grep -q '^FROM env$' docker/Dockerfile || { echo "make image: docker/Dockerfile: the final stage must be 'FROM env'" >&2; exit 1; }
STANDIN_BASE="localhost/repa-standin-base:bookworm-python3.11"
RUNTIME="${BUILDAH_RUNTIME:-runc}"
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
WORK="$(mktemp -d /tmp/repa-image.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

say() { printf 'make image: %s\n' "$*"; }
die() { printf 'make image: error: %s\n' "$*" >&2; exit 1; }
if command -v buildah > /dev/null; then BUILD=(buildah bud --runtime "$RUNTIME")
elif command -v podman > /dev/null; then BUILD=(podman build --runtime "$RUNTIME")
else die "no OCI builder: install buildah (or podman) and runc, e.g. apt-get install buildah podman runc"
fi
command -v podman > /dev/null || die "podman is needed to inspect and run the image: apt-get install podman runc"

# ---- the base ------------------------------------------------------------------------------------------
standin_base() {
	# Debian's own mirror, as this machine's apt is configured (deb822 or one-line sources).
	local mirror root
	mirror="$(cat /etc/apt/sources.list.d/*.sources 2> /dev/null | sed -n 's/^URIs: *\([^ ]*\).*/\1/p' | grep -v security | head -n1 || true)"
	[ -n "$mirror" ] || mirror="$(grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2> /dev/null | grep -v security | awk '{print $2}' | head -n1 || true)"
	[ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list*: debootstrap needs one"
	command -v debootstrap > /dev/null || die "no registry for $RELEASE_BASE and no debootstrap: apt-get install debootstrap"
	root="$WORK/rootfs"
	say "making the stand-in base $STANDIN_BASE (debootstrap bookworm from this machine's apt mirror)"
	debootstrap --variant=minbase --include=python3.11,python3-venv,python3-pip,ca-certificates \
		bookworm "$root" "$mirror" > "$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
	ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
	ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
	ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
	rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED # PEP 668: the official base has no such marker
	rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
	tar -C "$root" -c . | podman import \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
		--message "stand-in for $RELEASE_BASE: debootstrap bookworm + Debian python3.11" - "$STANDIN_BASE" > /dev/null
	rm -rf "$root"
}

BASE_NOTE=""
if [ -n "${REPA_BASE_IMAGE:-}" ]; then
	BASE="$REPA_BASE_IMAGE"
elif timeout 60 podman pull -q "docker.io/library/$RELEASE_BASE" > /dev/null 2>&1; then
	digest="$(podman image inspect --format '{{.Digest}}' "docker.io/library/$RELEASE_BASE")"
	BASE="docker.io/library/${RELEASE_BASE%%:*}@$digest"
	say "base: $BASE (the release base, pinned by digest)"
else
	podman image exists "$STANDIN_BASE" || standin_base
	BASE="$STANDIN_BASE"
	BASE_NOTE="built on a stand-in base, not the release base ($RELEASE_BASE could not be pulled: no registry)"
	say "$BASE_NOTE"
fi

# ---- this machine's pip configuration and CA bundle, mounted read-only into the environment's RUN step --
# Everything goes under /run/repa-build (pip reads PIP_CONFIG_FILE there); local paths the configuration
# names (file:// indexes, find-links folders, constraint files) are mounted at /run/repa-build/host<path>
# and rewritten to it. The final stage removes the empty mount points buildah leaves behind.
CA=""
for f in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
	[ -n "$f" ] && [ -f "$f" ] && { CA="$f"; break; }
done
mkdir -p "$WORK/pip"
{
	echo "[global]"
	[ -n "$CA" ] && echo "cert = /run/repa-build/pip/ca.crt"
	# PIP_* variables (":env:") and config files (global/install), as this machine's pip sees them
	${PIP:-python3 -m pip} config list 2> /dev/null | sed -n "s/^\(global\|install\|:env:\)\.\([a-z-]*\)='\(.*\)'$/\2 \3/p" |
		sort -u -k1,1 | while read -r key value; do
		[ "$key" = cert ] || echo "$key = $value"
	done
} > "$WORK/pip/pip.conf"
[ -n "$CA" ] && cp "$CA" "$WORK/pip/ca.crt"
VOLUMES=(--volume "$WORK/pip:/run/repa-build/pip:ro")
# A PEP 503 index folder (.../simple) links to files beside it, so its parent folder is mounted.
for p in $(sed -n 's/^[a-z-]* = //p' "$WORK/pip/pip.conf" | tr ' ' '\n' | sed 's|^file://||; s|/*$||; s|/simple$||' |
	grep '^/' | grep -v '^/run/repa-build' | sort -u); do
	[ -e "$p" ] || continue
	VOLUMES+=(--volume "$p:/run/repa-build/host$p:ro")
	sed -i "s| $p| /run/repa-build/host$p|g; s|file://$p|file:///run/repa-build/host$p|g" "$WORK/pip/pip.conf"
done
say "pip configuration from this machine: $(grep -c ' = ' "$WORK/pip/pip.conf") settings, CA bundle ${CA:-none} (mounted, not copied)"

# ---- the locked environment, cached by the hash of what it reads ----------------------------------------
base_id="$(podman image inspect --format '{{.Id}}' "$BASE")"
env_key="$({ # the env stage's instructions (comments and the base's name left out: its id counts), the inputs
	sed -n '/^FROM .* AS env$/,/^FROM .* AS build$/p' docker/Dockerfile | grep -v '^#' | sed '1d;$d'
	cat requirements/lock.txt docker/install-env.sh
	echo "$base_id"
} | sha256sum | cut -c1-16)"
ENV_IMAGE="localhost/repa-env:$env_key"
# docker/Dockerfile with its FROM lines rewritten: the base as chosen above, `FROM env` -> the cached env
# image, and the wheel's bind mount `from=build` -> the build stage built beforehand (see below).
WHEEL_IMAGE="localhost/repa-wheel-build:$$"
sed "s|^FROM $RELEASE_BASE AS|FROM $BASE AS|; s|^FROM env\$|FROM $ENV_IMAGE|; s|from=build,|from=$WHEEL_IMAGE,|" \
	docker/Dockerfile > "$WORK/Dockerfile"
grep -q "from=$WHEEL_IMAGE," "$WORK/Dockerfile" || die "docker/Dockerfile: the package step must bind-mount from=build"
old_image="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2> /dev/null || true)"
T0=$SECONDS
if podman image exists "$ENV_IMAGE"; then
	say "locked environment: $ENV_IMAGE (cached: lock, install-env.sh, env stage and base unchanged)"
else
	say "locked environment: building $ENV_IMAGE (requirements/lock.txt)"
	nice -n 10 "${BUILD[@]}" "${ULIMITS[@]}" "${VOLUMES[@]}" --pull=never \
		--build-arg PIP_CONFIG_FILE=/run/repa-build/pip/pip.conf --target env -f "$WORK/Dockerfile" -t "$ENV_IMAGE" .
fi
T1=$SECONDS
say "building $IMAGE (the repa wheel + docker/image_check.py on top of $ENV_IMAGE)"
# The wheel's build stage needs the index (setuptools for the build backend), so it is built first with the
# pip configuration mounted; the package step then needs no index and runs with nothing mounted, so that its
# layer holds no mount points and the final stage's cleanup can remove the env stage's.
nice -n 10 "${BUILD[@]}" "${ULIMITS[@]}" "${VOLUMES[@]}" --pull=never \
	--build-arg PIP_CONFIG_FILE=/run/repa-build/pip/pip.conf --target build -f "$WORK/Dockerfile" -t "$WHEEL_IMAGE" .
trap 'podman rmi "$WHEEL_IMAGE" > /dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
nice -n 10 "${BUILD[@]}" "${ULIMITS[@]}" --pull=never --label "org.opencontainers.image.base.name=$BASE" \
	-f "$WORK/Dockerfile" -t "$IMAGE" .
T2=$SECONDS
say "built $IMAGE: environment $((T1 - T0)) s, package layer $((T2 - T1)) s${BASE_NOTE:+ ($BASE_NOTE)}"
# No leftovers on the machine: the image this build replaced, and environments of older locks.
new_image="$(podman image inspect --format '{{.Id}}' "$IMAGE")"
[ -n "$old_image" ] && [ "$old_image" != "$new_image" ] && podman rmi "$old_image" > /dev/null 2>&1 || true
for stale in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/repa-env:' | grep -v ":$env_key$" || true); do
	podman rmi "$stale" > /dev/null 2>&1 || true
done
scripts/image-layers.sh "$IMAGE"
[ "$SMOKE" = 1 ] && scripts/smoke-image.sh "$IMAGE"
exit 0
