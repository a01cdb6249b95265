"""Prepared datasets: WebDataset shards + manifest.json (``format``), written by ``repa prepare``.

Only the pure format API is re-exported here (importing it pulls in neither fsspec nor torch);
``repa.data.order`` is the streaming reader's sample order (pure, numpy only), ``repa.data.reader``
the reader itself (fsspec, torch DataLoader) and ``repa.data.prepare`` the `repa prepare` stages.
See docs/data.md.
"""

from repa.data.format import (
    CROP,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    Sample,
    ShardError,
    ShardInfo,
    SkippedFile,
    adm_center_crop,
    check_shard_bytes,
    decode_moments,
    decode_png,
    encode_moments,
    encode_png,
    iter_shard,
    read_manifest,
    sample_key,
    shard_name,
    sidecar_name,
    write_shard,
)

__all__ = [
    "CROP",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "Sample",
    "ShardError",
    "ShardInfo",
    "SkippedFile",
    "adm_center_crop",
    "check_shard_bytes",
    "decode_moments",
    "decode_png",
    "encode_moments",
    "encode_png",
    "iter_shard",
    "read_manifest",
    "sample_key",
    "shard_name",
    "sidecar_name",
    "write_shard",
]
