"""The SiT size table as plain data: ``"SiT-XL/2" -> depth, width, heads, patch`` (no torch).

Config validation, ``repa config`` and FLOP estimates read it without building a model; the model
module builds ``SiT_models`` from it. Sizes from the SiT/DiT papers (Table 1) and REPA's
``models/sit.py`` (sihyun-yu/REPA).
"""

from __future__ import annotations

from typing import TypedDict


class SiTSize(TypedDict):
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


# size letter -> (depth, hidden_size, num_heads)
_WIDTHS: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}

SIT_SIZES: dict[str, SiTSize] = {
    f"SiT-{size}/{patch}": SiTSize(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _WIDTHS.items()
    for patch in (2, 4, 8)
}
