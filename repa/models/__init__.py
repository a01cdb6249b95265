"""SiT models: the network (``sit.py``) and its torch-free size table (``sizes.py``); plain ``nn``
(the official checkpoint layout is read by ``repa.checkpoint.model``).

Importing the package is cheap: the torch modules load on first use of their names, so
``repa.models.sizes`` serves config validation without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from repa.models.sizes import SIT_SIZES

__all__ = [
    "SIT_SIZES",
    "SiT",
    "SiT_models",
    "build_mlp",
    "build_model",
    "num_parameters",
]

_LAZY = {
    "SiT": "repa.models.sit",
    "SiT_models": "repa.models.sit",
    "build_mlp": "repa.models.sit",
    "build_model": "repa.models.sit",
    "num_parameters": "repa.models.sit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repa.models' has no attribute {name!r}")
