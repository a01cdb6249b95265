"""Small synthetic ImageNet-style sources for data tests (``train/<synset>/*.JPEG``, or a tar of it).

Images are real JPEG/PNG files of varied sizes and aspect ratios (landscape, portrait, square,
smaller than the target resolution, grayscale, CMYK), so the ADM crop, the colour conversion and
the decoder all do real work; ``corrupt`` adds files that no decoder can read.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ImageNetTree", "make_imagenet_tar", "make_imagenet_tree"]

DEFAULT_SYNSETS = ("n01440764", "n01443537", "n01484850")
# (width, height, PIL mode): landscape, portrait, square, tiny (upsampled), grayscale, CMYK, extreme aspect
_SHAPES = (
    (96, 64, "RGB"),
    (50, 120, "RGB"),
    (64, 64, "RGB"),
    (20, 24, "RGB"),
    (80, 70, "L"),
    (72, 90, "CMYK"),
    (160, 40, "RGB"),
)


@dataclasses.dataclass(frozen=True)
class ImageNetTree:
    """What ``make_imagenet_tree`` wrote: ``root`` holds ``<synset>/<file>``."""

    root: Path
    class_names: tuple[str, ...]
    good: tuple[str, ...]  # "synset/file" of decodable images
    corrupt: tuple[str, ...]  # "synset/file" of undecodable files

    @property
    def num_images(self) -> int:
        return len(self.good) + len(self.corrupt)


def _image(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    """A smooth random gradient plus one hard-edged rectangle (so crops differ visibly)."""
    base = rng.integers(0, 256, size=(3, 3, 3)).astype(np.float32)
    img = Image.fromarray(base.astype(np.uint8), "RGB").resize((width, height), Image.BILINEAR)
    arr = np.asarray(img).copy()
    y0, x0 = rng.integers(0, max(1, height // 2)), rng.integers(0, max(1, width // 2))
    arr[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, size=3)
    out = Image.fromarray(arr, "RGB")
    return out if mode == "RGB" else out.convert(mode)


def make_imagenet_tree(
    tmp_path: Path,
    *,
    synsets: tuple[str, ...] = DEFAULT_SYNSETS,
    per_class: int = 4,
    corrupt: int = 2,
    seed: int = 0,
    with_train_dir: bool = True,
) -> ImageNetTree:
    """Write ``tmp_path/imagenet/train/<synset>/<synset>_<i>.JPEG`` (JPEG; one PNG per class).

    ``corrupt`` extra files (a truncated JPEG, then non-image bytes, alternating) are spread over
    the classes. Also writes a non-image file per class and a top-level text file, which prepare
    must ignore. Returns the class folder root (``.../train``) and the file lists.
    """
    rng = np.random.default_rng(seed)
    top = tmp_path / "imagenet"
    root = top / "train" if with_train_dir else top
    good, bad = [], []
    for c, synset in enumerate(synsets):
        folder = root / synset
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h, mode = _SHAPES[(c * per_class + i) % len(_SHAPES)]
            img = _image(rng, w, h, mode)
            name = f"{synset}_{i}.JPEG"
            # ImageNet has a few PNGs named .JPEG: the decoder must sniff the content, not the name.
            fmt = "PNG" if i == per_class - 1 and mode in ("RGB", "L") else "JPEG"
            img.save(folder / name, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            good.append(f"{synset}/{name}")
        (folder / "notes.txt").write_text("not an image\n")
    for j in range(corrupt):
        synset = synsets[j % len(synsets)]
        name = f"{synset}_corrupt{j}.JPEG"
        if j % 2 == 0:
            buf = io.BytesIO()
            _image(rng, 64, 48, "RGB").save(buf, format="JPEG", quality=90)
            data = buf.getvalue()[: len(buf.getvalue()) // 3]  # truncated JPEG
        else:
            data = b"this is not an image at all" * 10
        (root / synset / name).write_bytes(data)
        bad.append(f"{synset}/{name}")
    (top / "LOC_synset_mapping.txt").write_text("\n".join(synsets) + "\n")
    return ImageNetTree(root, tuple(sorted(synsets)), tuple(sorted(good)), tuple(sorted(bad)))


def make_imagenet_tar(tree: ImageNetTree, tar_path: Path, *, nested: bool = False) -> Path:
    """Tar the tree: ``train/<synset>/<file>`` members, or (``nested``) one ``<synset>.tar`` per class
    as in ILSVRC2012_img_train.tar. Returns ``tar_path``."""
    with tarfile.open(tar_path, "w") as tar:
        for synset in tree.class_names:
            folder = tree.root / synset
            if nested:
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as inner:
                    for f in sorted(folder.iterdir()):
                        inner.add(f, arcname=f.name)
                info = tarfile.TarInfo(f"{synset}.tar")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
            else:
                for f in sorted(folder.iterdir()):
                    tar.add(f, arcname=f"train/{synset}/{f.name}")
    return tar_path
