"""One image of a `repa prepare` source (shared by the folder/tar sources and the IDX source)."""

from __future__ import annotations

import dataclasses

__all__ = ["SourceFile"]


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One source image: ``rel`` = ``"<synset>/<file name>"``; tar sources also give its byte range."""

    rel: str
    label: int
    offset: int = -1
    size: int = -1
