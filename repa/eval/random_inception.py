"""A random-weights Inception-v3 for FID's code path without the real (downloaded) weights.

torch-fidelity's ``FeatureExtractorInceptionV3`` needs the TF-ported weights file
(weights-inception-2015-12-05-6726825d.pth, ~91 MiB), which repa never downloads. ``repa demo`` writes
this stand-in when no ``--inception-weights`` is given, and the tests use it
(tests/support/fidelity_weights.py), so every line of the real evaluation runs offline. FID values
computed with it are meaningless (comparable only between runs given the same file).
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["make_random_inception_weights"]


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a state dict for torch-fidelity's InceptionV3 with random weights to ``path``.

    FID values computed with it are meaningless (comparable only with the same file), but every line
    of the real evaluation runs. Convolutions get He (fan-in, ReLU gain) init: with PyTorch's default
    init the activations shrink through the ~95 conv layers and the pool features vanish (FID ~
    1e-13). BatchNorm stays the identity. The classifier gets std 10/sqrt(2048), so the Inception
    Score differs measurably from 1. Deterministic for a seed.
    """
    import torch
    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from repa.eval.features import INCEPTION_NAME

    class _Unloaded(FeatureExtractorInceptionV3):
        # The constructor always loads (or downloads) weights: give it an empty file, skip the load.
        def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            return None

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({}, tmp)
    net = _Unloaded(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=tmp)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 10.0 / math.sqrt(module.in_features), generator=gen)
                module.bias.zero_()
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: an interrupted demo never leaves half a weights file
    return path
