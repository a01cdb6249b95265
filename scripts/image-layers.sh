#!/usr/bin/env bash
# The layers of an image, base first: size and the image each is the top layer of (the stand-in or release
# base, the cached environment localhost/repa-env:<hash>, the package layer): what a code change re-ships.
#   scripts/image-layers.sh IMAGE
set -euo pipefail
podman image tree "$1" | sed -n '/Image Layers/,$p'
