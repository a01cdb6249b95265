"""What `repa prepare` reports: PrepareError, the per-invocation PrepareSummary, progress bars, bad images.

Unreadable source images are skipped and listed, and a stage fails once more than
``max_bad_fraction`` of them are bad (``too_many_bad`` words the error); see docs/data.md,
"How the images stage works".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from repa.data.format import MANIFEST_NAME, Manifest, SkippedFile

__all__ = ["DEFAULT_MAX_BAD_FRACTION", "PrepareError", "PrepareSummary", "progress_bar", "too_many_bad"]

DEFAULT_MAX_BAD_FRACTION = 0.001


class PrepareError(ValueError):
    """Bad input or state for `repa prepare` (source layout, unwritable output, too many bad images)."""


@dataclasses.dataclass
class PrepareSummary:
    """What one `repa prepare` invocation did (printed by the CLI)."""

    stage: str
    worker_index: int = 0
    worker_count: int = 1
    shards_assigned: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    samples_written: int = 0
    bytes_written: int = 0
    bad_files: list[SkippedFile] = dataclasses.field(default_factory=list)
    moments_fp16_error: dict[str, float] | None = None
    manifest: Manifest | None = None
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"repa prepare {self.stage}: worker {self.worker_index}/{self.worker_count}: "
            f"{self.shards_written} of {self.shards_assigned} shards written, "
            f"{self.shards_skipped} already done; "
            f"{self.samples_written:,} samples, {self.bytes_written / 1e6:,.1f} MB in {self.seconds:,.1f} s"
        ]
        if self.bad_files:
            lines.append(f"skipped {len(self.bad_files)} unreadable source image(s):")
            lines.extend(f"  {b.source} (key {b.key}): {b.reason}" for b in self.bad_files[:50])
            if len(self.bad_files) > 50:
                lines.append(f"  ... and {len(self.bad_files) - 50} more (listed in the shards' sidecars)")
        if self.moments_fp16_error:
            e = self.moments_fp16_error
            lines.append(
                f"float16 moments: posterior-latent relative error {e['rel_l2']:.2e} "
                f"(max |err|/posterior std {e['max_abs_over_std']:.2e}; "
                f"bfloat16 rounding of the same latents: {e['bf16_input_rel_l2']:.2e})"
            )
        if self.manifest is not None:
            m = self.manifest
            lines.append(
                f"{MANIFEST_NAME} written: {m.num_samples:,} samples, {len(m.shards)} shards, "
                f"{m.num_classes} classes, {m.total_bytes / 1e9:,.2f} GB, vae={m.vae}"
            )
        else:
            lines.append(f"{MANIFEST_NAME} not written yet: other shards are still to do (or run `finalize`)")
        return "\n".join(lines)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over ``total`` shards (disabled: a no-op bar, the logs only)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled, dynamic_ncols=True)


def too_many_bad(bad: Sequence[SkippedFile], total: int, limit: float, where: str) -> str:
    """The error when more than ``limit`` of ``total`` source images are unreadable (names the first ten)."""
    listed = "; ".join(f"{b.source}: {b.reason}" for b in bad[:10])
    more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
    return (
        f"{where}: {len(bad)} of {total} source images are unreadable, more than max_bad_fraction={limit} "
        f"allows: {listed}{more}. Check the source, or raise --max-bad-fraction to accept them"
    )
