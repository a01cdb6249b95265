"""Sidecars: ``shard-NNNNNN.json``, the per-shard record written after its shard, the unit of restart.

A shard is committed atomically (local: temp file + rename; object stores: one PUT), then its
sidecar (ShardInfo, key -> source file, the latents state). A shard whose sidecar exists, belongs
to the same plan and whose size matches is done; ``manifest.json`` is assembled from the sidecars
(``finalize``). See docs/data.md, "Restart semantics".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from repa import storage
from repa.data.format import FORMAT_VERSION, ManifestError, ShardInfo, sidecar_name

__all__ = ["Sidecar", "read_sidecar", "write_sidecar"]


@dataclasses.dataclass
class Sidecar:
    """``shard-NNNNNN.json``: the committed shard's ShardInfo, provenance, and latents state."""

    plan: str
    shard: ShardInfo
    sources: dict[str, str]  # key -> "<class>/<file>"
    vae: str | None = None
    vae_details: dict[str, Any] | None = None
    moments_dtype: str | None = None
    moments_shape: tuple[int, ...] | None = None
    moments_fp16_error: dict[str, float] | None = None
    pending: dict[str, Any] | None = None  # latents rewrite in flight: the new shard's {bytes, sha256}

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["shard"] = self.shard.to_dict()
        d["moments_shape"] = None if self.moments_shape is None else list(self.moments_shape)
        d["format_version"] = FORMAT_VERSION
        return (json.dumps(d, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Sidecar:
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            shape = d.get("moments_shape")
            return cls(
                plan=d["plan"],
                shard=ShardInfo.from_dict(d["shard"], where=f"{where}: shard"),
                sources=dict(d.get("sources", {})),
                vae=d.get("vae"),
                vae_details=d.get("vae_details"),
                moments_dtype=d.get("moments_dtype"),
                moments_shape=None if shape is None else tuple(shape),
                moments_fp16_error=d.get("moments_fp16_error"),
                pending=d.get("pending"),
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{where}: malformed sidecar ({type(e).__name__}: {e})") from None


def read_sidecar(data_url: str | storage.Location, shard: int) -> Sidecar:
    url = storage.join(data_url, sidecar_name(shard))
    return Sidecar.from_json(storage.read_bytes(url), where=str(url))


def write_sidecar(data_url: str | storage.Location, shard: int, sidecar: Sidecar) -> None:
    storage.write_bytes_atomic(storage.join(data_url, sidecar_name(shard)), sidecar.to_json())
