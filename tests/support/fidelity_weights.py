"""A random-weights file for torch-fidelity's InceptionV3, so FID/IS tests run offline (built by
repa.eval.random_inception).

The real TF-ported weights (~91 MiB) are a download, which tests must not need. A file with the same
architecture and random weights exercises the exact code path; FID values are meaningless but
comparable between two implementations fed the same file.

Convolutions get He (kaiming-normal, fan-in, ReLU gain) init: with PyTorch's default init the
activations shrink through the ~95 conv layers and the pool features vanish (FID ~ 1e-13). BatchNorm
stays at identity (running mean 0, var 1). The classifier weights get std 10/sqrt(2048) so the
Inception Score differs measurably from 1 (~1.03 on the test images: a random network's features
vary little between images, and larger logits only sharpen a class-constant prediction).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache

# One maker for the demo and the tests (the product ships it: demo users without the real file need it).
from repa.eval.random_inception import make_random_inception_weights


@cache
def random_inception_weights_path(seed: int = 0) -> str:
    """Build the file once per test process in a temporary folder removed at exit."""
    folder = tempfile.mkdtemp(prefix="repa-inception-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return make_random_inception_weights(os.path.join(folder, f"random-inception-{seed}.pth"), seed)
