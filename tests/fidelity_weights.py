"""A random-weights file for torch-fidelity's InceptionV3, so FID/IS tests run offline.

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
import math
import os
import shutil
import tempfile
from functools import cache

import torch
from torch import nn


def make_random_inception_weights(path: str, seed: int = 0) -> str:
    """Write a state dict for ``FeatureExtractorInceptionV3`` with random weights to ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        # The constructor always loads weights (or downloads them): give it an empty file and skip loading.
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({}, path)
    net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 10.0 / math.sqrt(module.in_features), generator=gen)
                module.bias.zero_()
    torch.save(net.state_dict(), path)
    return path


@cache
def random_inception_weights_path(seed: int = 0) -> str:
    """Build the file once per test process in a temporary folder removed at exit."""
    folder = tempfile.mkdtemp(prefix="repa-inception-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return make_random_inception_weights(os.path.join(folder, f"random-inception-{seed}.pth"), seed)
