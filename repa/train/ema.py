"""Exponential moving average of the model weights, kept in fp32 (as the reference ``train.py``).

Reference (``train.py update_ema``): initialised as a copy of the model (decay 0 at step 0),
then every optimiser step ``ema = decay * ema + (1 - decay) * param`` over ``named_parameters()``
including the frozen ``pos_embed``. The same two ops in the same order are used here, batched with
``torch._foreach_*`` (one kernel launch per op for all tensors instead of one per parameter).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of ``model`` in eval mode."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = [p for _, p in ema.named_parameters()]
    model_params = [p.detach().float() for _, p in model.named_parameters()]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)
