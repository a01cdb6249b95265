"""A tiny deterministic conv feature extractor for eval tests (repa.eval.features.FeatureExtractor protocol).

Written as a module file into a test's tmp folder, because `repa eval/watch --feature-extractor
MODULE:CALLABLE` imports it by name, also in subprocesses (put the folder on PYTHONPATH).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

FEATS = "repa_test_feats:build"
FEATS_SOURCE = '''
"""A tiny deterministic conv feature extractor (repa.eval.features.FeatureExtractor protocol)."""
import torch
from torch import nn


class TinyConv(nn.Module):
    name = "tiny-conv"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, images):  # uint8 (B, 3, H, W) -> (B, 16)
        h = torch.relu(self.conv(images.float() / 127.5 - 1))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


def build():
    return TinyConv()
'''


def write_feature_module(folder: Path) -> Path:
    """Write ``repa_test_feats.py`` into ``folder`` (created) and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "repa_test_feats.py").write_text(textwrap.dedent(FEATS_SOURCE))
    return folder
