"""Image sources for evaluation: uint8 image batches from tensors, arrays, ``.npz`` files and folders.

Every metric reads its images through :func:`iter_image_batches`, which accepts any
:data:`ImageSource` (in memory, or a local path / fsspec URL: an ``.npz`` with ADM's ``arr_0``, a
folder of ``.npz`` chunks as ``repa sample`` writes them, or a folder of .png/.jpg files), streams it
without loading it whole, and validates dtype, layout and size batch by batch.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from repa import storage
from repa.eval.errors import MetricsError

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "UInt8ImageDataset", "iter_image_batches"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

ImageSource = torch.Tensor | np.ndarray | str | os.PathLike | Iterable[torch.Tensor | np.ndarray]
"""uint8 images: a tensor (N, 3, H, W); an array (N, H, W, 3) (ADM's ``arr_0`` layout); an iterable
of such batches; or a path/URL of an ``.npz`` (key ``arr_0``), of a folder of ``.npz`` chunks, or of a
folder of .png/.jpg files."""


def _as_nchw_uint8(batch: Any, where: str) -> torch.Tensor:
    """Validate one batch and return it as a uint8 tensor (B, 3, H, W)."""
    if isinstance(batch, np.ndarray):
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise MetricsError(
                f"{where}: numpy images must be (N, H, W, 3) uint8 (ADM's arr_0 layout), got shape "
                f"{batch.shape}; pass NCHW images as a torch tensor"
            )
        if batch.dtype != np.uint8:
            raise MetricsError(f"{where}: images must be uint8 in [0, 255], got dtype {batch.dtype}")
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    if not torch.is_tensor(batch):
        raise MetricsError(
            f"{where}: expected a uint8 torch tensor or numpy array, got {type(batch).__name__}"
        )
    if batch.dtype != torch.uint8:
        raise MetricsError(
            f"{where}: images must be uint8 in [0, 255], got dtype {batch.dtype} "
            "(convert with (x.clamp(-1, 1) + 1) * 127.5 -> uint8, or as the sampler does)"
        )
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise MetricsError(
            f"{where}: images must be (N, 3, H, W) with 3 channels, got shape {tuple(batch.shape)}"
        )
    return batch


def _iter_npz_array(url: str, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Stream rows of one array of an .npz without loading it whole (a 50K x 256^2 arr_0 is 9.8 GB)."""
    if not storage.exists(url):
        raise MetricsError(f"{url}: not found")
    with storage.open_url(url) as f, zipfile.ZipFile(f) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key not in names:
            raise MetricsError(f"{url}: no array {key!r} in the npz; found keys {sorted(names)}")
        with zf.open(key + ".npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
            if fortran_order or len(shape) == 0 or dtype.hasobject:
                raise MetricsError(
                    f"{url}: array {key!r} must be a C-ordered numeric array, got {shape} {dtype}"
                )
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                rows = min(batch_size, shape[0] - start)
                buf = member.read(rows * row_bytes)
                yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((rows, *shape[1:]))  # writable


def _iter_folder(url: str, batch_size: int) -> Iterator[np.ndarray]:
    """A folder of ``.npz`` chunks (``arr_0`` each, name order; what ``repa sample`` writes under
    ``chunks/``) or else of .png/.jpg images (name order)."""
    from PIL import Image

    entries = storage.listdir(url)
    chunks = [n for n in entries if n.endswith(".npz")]
    if chunks:
        for name in chunks:
            yield from _iter_npz_array(storage.join(url, name), "arr_0", batch_size)
        return
    names = [n for n in entries if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise MetricsError(f"{url}: no .npz files and no {'/'.join(IMAGE_EXTENSIONS)} images found")
    for start in range(0, len(names), batch_size):
        batch = []
        for name in names[start : start + batch_size]:
            with Image.open(io.BytesIO(storage.read_bytes(storage.join(url, name)))) as img:
                batch.append(np.asarray(img.convert("RGB")))
        shapes = {b.shape for b in batch}
        if len(shapes) > 1:
            raise MetricsError(f"{url}: images of different sizes {sorted(shapes)}")
        yield np.stack(batch)


def iter_image_batches(images: ImageSource, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield validated uint8 (B<=batch_size, 3, H, W) CPU tensors from any :data:`ImageSource`.

    Raises :class:`MetricsError` naming the batch for a wrong dtype, layout or channel count, or when
    batches disagree in image size.
    """
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, os.PathLike):
        images = os.fspath(images)
    if isinstance(images, str):
        source = _iter_npz_array(images, "arr_0", batch_size) if images.endswith(".npz") else None
        if source is None:
            source = _iter_folder(images, batch_size)
        label = images
    elif torch.is_tensor(images) or isinstance(images, np.ndarray):
        source = iter([images])
        label = "images"
    else:
        source = iter(images)
        label = "images"
    size: tuple[int, int] | None = None
    for i, raw in enumerate(source):
        batch = _as_nchw_uint8(raw, f"{label} (batch {i})")
        if size is None:
            size = (batch.shape[2], batch.shape[3])
        elif (batch.shape[2], batch.shape[3]) != size:
            raise MetricsError(
                f"{label} (batch {i}): image size {tuple(batch.shape[2:])} differs from earlier "
                f"batches {size}"
            )
        yield from batch.split(batch_size)


class UInt8ImageDataset(Dataset):
    """uint8 images as the ``Dataset`` torch-fidelity's ``calculate_metrics`` accepts (items (3, H, W))."""

    def __init__(self, images: torch.Tensor | np.ndarray) -> None:
        self.images = _as_nchw_uint8(images, "UInt8ImageDataset")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
