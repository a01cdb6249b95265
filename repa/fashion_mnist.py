"""Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747; MIT licence): real images that need no download.

Where the files come from, first found wins:

1. ``$REPA_FASHION_MNIST``: a folder holding the four IDX files (a user's copy);
2. Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``): the full set,
   60,000 train + 10,000 test, under /usr/share/datasets/fashion-mnist/;
3. the subset shipped inside repa (``repa/assets/fashion-mnist/``, see its README): the first
   ``SUBSET_TRAIN`` train and ``SUBSET_TEST`` test images of every class, so `repa demo` runs offline
   anywhere. ``python -m repa.fashion_mnist write-subset`` regenerates it from the full set.

The files are the original gzipped IDX files (``repa.data.prepare.idx`` reads them, and `repa prepare
images <folder>` turns a folder of them into shards).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import sys
from pathlib import Path

import numpy as np

from repa.data.prepare.idx import read_idx

__all__ = ["CLASS_NAMES", "FashionMnist", "find", "load_split", "write_subset"]

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIPPED_DIR = Path(__file__).parent / "assets" / "fashion-mnist"
SUBSET_TRAIN, SUBSET_TEST = 500, 150  # images per class in the shipped subset (2.9 MB gzipped)
ENV = "REPA_FASHION_MNIST"


@dataclasses.dataclass(frozen=True)
class FashionMnist:
    """A folder of the four IDX files and what it is (``full`` or the shipped ``subset``)."""

    folder: Path
    kind: str

    def describe(self) -> str:
        return f"Fashion-MNIST {self.kind} ({self.folder})"


def _complete(folder: Path) -> bool:
    return all(
        any((folder / f"{split}-{what}{gz}").exists() for gz in (".gz", ""))
        for split in ("train", "t10k")
        for what in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


def find(prefer_subset: bool = False) -> FashionMnist:
    """The Fashion-MNIST files to use (see the module docstring); ``prefer_subset``: the shipped one."""
    if not prefer_subset:
        user = os.environ.get(ENV)
        if user:
            if not _complete(Path(user)):
                raise FileNotFoundError(
                    f"${ENV}={user}: expected the four Fashion-MNIST *-idx?-ubyte[.gz] files there"
                )
            return FashionMnist(Path(user), "copy")
        if _complete(DEBIAN_DIR):
            return FashionMnist(DEBIAN_DIR, "full")
    if not _complete(SHIPPED_DIR):
        raise FileNotFoundError(
            f"{SHIPPED_DIR}: the shipped Fashion-MNIST subset is missing (a broken install?)"
        )
    return FashionMnist(SHIPPED_DIR, "subset")


def _file(folder: Path, stem: str) -> Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.exists() else folder / stem


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` (``train`` or ``t10k``)."""
    images_path = _file(folder, f"{split}-images-idx3-ubyte")
    labels_path = _file(folder, f"{split}-labels-idx1-ubyte")
    images = read_idx(images_path.read_bytes(), str(images_path))
    labels = read_idx(labels_path.read_bytes(), str(labels_path)).astype(np.int64)
    return images, labels


def _write_idx(path: Path, array: np.ndarray) -> None:
    """uint8 array -> gzipped IDX (mtime 0, so the file is byte-identical on every run)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_subset(
    source: Path,
    out: Path,
    train: int = SUBSET_TRAIN,
    test: int = SUBSET_TEST,
    classes: int = len(CLASS_NAMES),
) -> None:
    """The first ``train`` / ``test`` images of each of the first ``classes`` classes of ``source``, in
    file order, as gzipped IDX files in ``out`` (the shipped subset is this with the defaults, so any
    smaller pick is the same images whether ``source`` is the subset or the full set).
    ValueError if ``source`` holds fewer."""
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train), ("t10k", test)):
        images, labels = load_split(source, split)
        picked = [np.flatnonzero(labels == c)[:per_class] for c in range(classes)]
        short = min(len(p) for p in picked)
        if short < per_class:
            raise ValueError(f"{source}: only {short} {split} images in some class, {per_class} wanted")
        keep = np.sort(np.concatenate(picked))
        _write_idx(out / f"{split}-images-idx3-ubyte.gz", images[keep])
        _write_idx(out / f"{split}-labels-idx1-ubyte.gz", labels[keep].astype(np.uint8))


if __name__ == "__main__":  # python -m repa.fashion_mnist write-subset [SOURCE_DIR]
    if sys.argv[1:2] != ["write-subset"]:
        sys.exit("usage: python -m repa.fashion_mnist write-subset [FULL_SET_DIR]")
    write_subset(Path(sys.argv[2]) if len(sys.argv) > 2 else DEBIAN_DIR, SHIPPED_DIR)
    print(f"wrote {SHIPPED_DIR}")
