"""sFID's spatial features, tapped from the same Inception forward pass that gives pool_3 and the logits.

ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``; Nash et al. 2021, "Generating
images with sparse representations", introduced sFID) reads two tensors of the 2015-12-05 TF
InceptionV3 graph in one ``session.run``: ``pool_3:0`` (FID, precision/recall) and
``mixed_6/conv:0``, of which it keeps ``spatial[..., :7]`` (NHWC: the first 7 channels at 17x17) and
flattens each image to 17 * 17 * 7 = 2023 numbers; sFID is the Fréchet distance of Gaussians fitted
to those (``mu_s``/``sigma_s`` in its reference batches).

Which module of torch-fidelity's port (``FeatureExtractorInceptionV3``, torchvision's layout) that is:

- the TF graph numbers its Inception blocks ``mixed, mixed_1, ..., mixed_10``; torchvision/torch-fidelity
  name the same eleven blocks ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c``. ``mixed_6`` is the
  seventh: ``Mixed_6d`` (an InceptionC block at 17x17, 768 channels in and out);
- inside a block the TF graph names its 1x1 branch ``conv`` and the others ``tower``, ``tower_1``,
  ``tower_2``; ``mixed_6/conv`` is the output of that branch's ReLU (the graph's ``conv`` node is the
  ReLU after ``conv/Conv2D`` and ``conv/batchnorm``): torch-fidelity's ``Mixed_6d.branch1x1``, a
  ``BasicConv2d`` (conv, batch norm, ReLU) with 192 channels at 17x17.

A forward hook on that module copies ``[:, :7]`` and flattens it in TF's (H, W, C) order, so the
2023 dimensions are in ADM's order and ADM's ``mu_s``/``sigma_s`` apply as they are. The pass itself is
torch-fidelity's, unchanged: Inception runs once per image for FID, sFID, IS and precision/recall.
tests/integration/test_inception_sfid.py checks the module, the shapes and the order against the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "SPATIAL_BLOCK",
    "SPATIAL_CHANNELS",
    "SPATIAL_DIM",
    "SPATIAL_MODULE",
    "SPATIAL_TF_TENSOR",
    "TF_BLOCK_NAMES",
    "TORCH_BLOCK_NAMES",
    "SpatialTap",
    "spatial_features",
]

TF_BLOCK_NAMES = ("mixed", *(f"mixed_{i}" for i in range(1, 11)))
"""The TF 2015 graph's Inception blocks in order; torch-fidelity's are TORCH_BLOCK_NAMES, one for one."""
TORCH_BLOCK_NAMES = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")  # fmt: skip
SPATIAL_TF_TENSOR = "mixed_6/conv:0"
"""ADM's ``FID_SPATIAL_NAME``."""
SPATIAL_BLOCK = TORCH_BLOCK_NAMES[TF_BLOCK_NAMES.index("mixed_6")]  # "Mixed_6d"
SPATIAL_MODULE = f"{SPATIAL_BLOCK}.branch1x1"
"""The module of torch-fidelity's InceptionV3 whose output is ``mixed_6/conv:0`` (module docstring)."""
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023


def spatial_features(activation: torch.Tensor) -> torch.Tensor:
    """``mixed_6/conv`` activations (B, 192, 17, 17), NCHW -> ADM's sFID features (B, 2023) float32.

    ADM keeps ``spatial[..., :7]`` of the NHWC tensor and reshapes to (B, -1): (H, W, C) order.
    """
    if activation.ndim != 4 or activation.shape[2:] != (17, 17):
        raise ValueError(f"expected mixed_6/conv activations (B, C, 17, 17), got {tuple(activation.shape)}")
    x = activation[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (B, 17, 17, 7), TF's layout
    return x.reshape(x.shape[0], -1).float()


class SpatialTap:
    """A forward hook on ``net.Mixed_6d.branch1x1`` keeping the last batch's sFID features.

    ``net`` is torch-fidelity's ``FeatureExtractorInceptionV3``; ``take()`` returns (and forgets) the
    features of the latest forward pass. One tap per network; the pass is not changed or repeated.
    """

    def __init__(self, net: nn.Module) -> None:
        self.module = net.get_submodule(SPATIAL_MODULE)
        self._last: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._last = spatial_features(output)  # a copy: reshaping the permuted slice copies it

    def take(self) -> torch.Tensor:
        if self._last is None:
            raise RuntimeError(f"no {SPATIAL_MODULE} activation recorded: run the network first")
        out, self._last = self._last, None
        return out

    def remove(self) -> None:
        self._handle.remove()
