"""`repa prepare` source for IDX files: MNIST, Fashion-MNIST, EMNIST, KMNIST (gzipped or not).

IDX is LeCun's format for MNIST (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a 4-byte magic
``0x00 0x00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then the row-major data. Images are
``idx3`` uint8 (N, H, W), labels ``idx1`` uint8 (N,). The four Fashion-MNIST files (Debian's
``dataset-fashion-mnist`` installs them under /usr/share/datasets/fashion-mnist/) are

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz  (60,000)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz   (10,000)

A source URL is either such a folder (its ``train`` split) or one images file (its labels file is the
same name with ``labels-idx1``). Each image becomes a lossless grayscale PNG named
``<label>/<split>-<index>.png``, so the rest of the pipeline sees an ImageNet-style class tree; class
names are the zero-padded label numbers (sorting them keeps label order).
"""

from __future__ import annotations

import gzip
import io
import re

import numpy as np
from PIL import Image

from repa import storage
from repa.data.prepare.report import PrepareError
from repa.data.prepare.source_file import SourceFile

__all__ = ["IdxSource", "find_idx_pair", "is_idx_source", "read_idx"]

# IDX type byte -> numpy dtype (big-endian where it matters); LeCun's table.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGES = re.compile(r"^(?P<split>.+)-images-idx3-ubyte(?P<gz>\.gz)?$")


def read_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes (gzip detected by its magic) into an array; PrepareError naming ``what`` if bad."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise PrepareError(f"{what}: not a readable gzip file ({e})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _DTYPES:
        raise PrepareError(f"{what}: not an IDX file (magic {data[:4].hex()}; expected 0000080N)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise PrepareError(f"{what}: IDX header truncated ({len(data)} bytes, {ndim} dimensions)")
    shape = tuple(int(x) for x in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise PrepareError(f"{what}: {len(data)} bytes, but its header {shape} needs {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def is_idx_source(source_url: str | storage.Location) -> bool:
    """True if ``source_url`` is an images IDX file or a folder holding one (checked without reading it)."""
    if _IMAGES.match(_name(str(source_url))):
        return True
    try:
        names = [e.name for e in storage.list_entries(source_url) if not e.is_dir]
    except (OSError, storage.StorageError):
        return False
    return any(_IMAGES.match(n) for n in names)


def find_idx_pair(source_url: str | storage.Location) -> tuple[object, object, str]:
    """``(images location, labels location, split)`` of a folder (its train split) or of an images file."""
    name = _name(str(source_url))
    if _IMAGES.match(name):
        folder_url = str(source_url).rstrip("/")[: -len(name)].rstrip("/") or "."
        folder = (
            storage.Location(folder_url, source_url.options)
            if isinstance(source_url, storage.Location)
            else folder_url
        )
        images_name = name
    else:
        folder = source_url
        names = sorted(e.name for e in storage.list_entries(source_url) if not e.is_dir)
        found = [n for n in names if _IMAGES.match(n)]
        train = [n for n in found if _IMAGES.match(n)["split"] == "train"]
        if not train and len(found) != 1:
            raise PrepareError(
                f"{source_url}: holds IDX files {found} but no train-images-idx3-ubyte[.gz]; "
                "name the images file to use as the source"
            )
        images_name = (train or found)[0]
    m = _IMAGES.match(images_name)
    assert m is not None
    labels_name = f"{m['split']}-labels-idx1-ubyte{m['gz'] or ''}"
    return storage.join(folder, images_name), storage.join(folder, labels_name), m["split"]


class IdxSource:
    """IDX images + labels as a `repa prepare` source (see the module docstring); held in memory."""

    def __init__(self, source_url: str | storage.Location, *, max_per_class: int | None = None) -> None:
        images_url, labels_url, self.split = find_idx_pair(source_url)
        self.url = str(source_url)
        if not storage.exists(labels_url):
            raise PrepareError(f"{labels_url}: labels file not found (needed beside {images_url})")
        self.images = read_idx(storage.read_bytes(images_url), str(images_url))
        labels = read_idx(storage.read_bytes(labels_url), str(labels_url))
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise PrepareError(
                f"{images_url}: expected uint8 images (N, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(self.images):
            raise PrepareError(
                f"{labels_url}: {labels.shape} labels for {len(self.images)} images in {images_url}"
            )
        self.labels = labels.astype(np.int64)
        n_classes = int(self.labels.max()) + 1
        width = len(str(n_classes - 1))
        self.class_names = tuple(f"{c:0{width}d}" for c in range(n_classes))
        self.files: list[SourceFile] = []
        index_width = len(str(len(self.images) - 1))
        for c in range(n_classes):
            indices = np.flatnonzero(self.labels == c)
            if not len(indices):
                raise PrepareError(f"{labels_url}: no image has label {c} (labels run 0..{n_classes - 1})")
            if max_per_class is not None:
                indices = indices[:max_per_class]
            name = self.class_names[c]
            self.files += [
                SourceFile(f"{name}/{self.split}-{i:0{index_width}d}.png", c, int(i)) for i in indices
            ]

    def read(self, f: SourceFile) -> bytes:
        """The image as a lossless grayscale PNG (prepare's crop turns it into RGB)."""
        buf = io.BytesIO()
        Image.fromarray(self.images[f.offset], "L").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def close(self) -> None:
        pass
