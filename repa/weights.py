"""Loading torch weight files without executing code from them.

``torch.load(weights_only=True)`` refuses arbitrary pickled objects. The REPA reference
checkpoints (``{model, ema, opt, args, steps}``) store ``args`` as an ``argparse.Namespace``,
so that one plain class is allowed explicitly; everything else must be tensors and builtins.
Safetensors files are read with the safetensors library.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import torch

from repa import storage

# Plain classes a reference checkpoint needs beyond tensors and builtins (see module docstring).
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class WeightsError(ValueError):
    """A weights file is missing, unreadable or not what was expected; the message names it."""


def load_torch_file(where: str | storage.Location) -> Any:
    """Load a ``.pt``/``.pth``/``.safetensors`` file from a local path, fsspec URL or Location, safely."""
    url = str(where)
    try:
        data = storage.read_bytes(where)
    except FileNotFoundError as e:
        raise WeightsError(f"weights file {url!r} not found") from e
    return load_torch_bytes(data, url)


def load_torch_bytes(data: bytes, url: str) -> Any:
    """:func:`load_torch_file` of bytes already read (e.g. hashed while reading); ``url`` names them."""
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise WeightsError(f"weights file {url!r} is not a readable safetensors file: {e}") from e
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError with long texts
        raise WeightsError(
            f"weights file {url!r} could not be loaded safely (weights_only=True): {str(e).splitlines()[0]}"
        ) from e
