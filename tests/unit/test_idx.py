"""IDX files (MNIST, Fashion-MNIST) as a `repa prepare` source; the Fashion-MNIST subset shipped with repa."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repa import fashion_mnist
from repa.data.format import iter_shard
from repa.data.prepare import PrepareError, open_source, prepare_images
from repa.data.prepare.idx import read_idx


def _idx_folder(folder: Path, classes: int = 3, per_class: int = 4, gz: bool = True) -> np.ndarray:
    """train- and t10k- IDX files of ``classes`` x ``per_class`` 8x8 images; image i is filled with i."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(classes), per_class)).astype(np.uint8)
    images = (np.arange(len(labels), dtype=np.uint8)[:, None, None] * np.ones((1, 8, 8), np.uint8)) * 10
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        fashion_mnist._write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        fashion_mnist._write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
        if not gz:
            for what in ("images-idx3", "labels-idx1"):
                path = folder / f"{split}-{what}-ubyte.gz"
                (folder / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
                path.unlink()
    return labels


def test_read_idx_decodes_gzipped_and_plain_files_and_names_bad_ones(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    fashion_mnist._write_idx(tmp_path / "a.gz", array)
    packed = (tmp_path / "a.gz").read_bytes()
    np.testing.assert_array_equal(read_idx(packed), array)
    np.testing.assert_array_equal(read_idx(gzip.decompress(packed)), array)
    with pytest.raises(PrepareError, match=r"x\.idx: not an IDX file"):
        read_idx(b"\x89PNG....", "x.idx")
    with pytest.raises(PrepareError, match=r"39 bytes, but its header \(2, 3, 4\) needs 40"):
        read_idx(gzip.decompress(packed)[:-1])


@pytest.mark.parametrize("gz", [True, False])
def test_prepare_images_reads_an_idx_folder_into_class_labelled_shards(tmp_path, gz):
    labels = _idx_folder(tmp_path / "src", gz=gz)
    summary = prepare_images(
        str(tmp_path / "src"), f"file://{tmp_path}/out", resolution=8, samples_per_shard=5
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == len(labels) and manifest["class_names"] == ["0", "1", "2"]
    assert summary.samples_written == len(labels)
    seen = {}
    for shard in sorted((tmp_path / "out").glob("shard-*.tar")):
        for sample in iter_shard(io.BytesIO(shard.read_bytes())):
            with Image.open(io.BytesIO(sample["png"])) as image:
                value = int(np.asarray(image.convert("L")).mean().round())
            seen[value // 10] = sample["label"]  # the image's index -> the label it was stored with
    assert seen == {i: int(label) for i, label in enumerate(labels)}


def test_an_images_file_selects_its_split_and_a_missing_labels_file_is_named(tmp_path):
    _idx_folder(tmp_path / "src", per_class=2)
    source = open_source(str(tmp_path / "src" / "t10k-images-idx3-ubyte.gz"), max_per_class=1)
    assert source.split == "t10k" and len(source.files) == 3
    assert all(f.rel.startswith(f"{f.label}/t10k-") for f in source.files)
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(PrepareError, match=r"t10k-labels-idx1-ubyte\.gz: labels file not found"):
        open_source(str(tmp_path / "src" / "t10k-images-idx3-ubyte.gz"))


def test_the_shipped_subset_is_small_licensed_and_the_first_images_of_every_class():
    subset = fashion_mnist.find(prefer_subset=True)
    assert subset.kind == "subset"
    assert sum(p.stat().st_size for p in subset.folder.iterdir()) < 4_000_000
    assert "MIT License" in (subset.folder / "README.md").read_text()
    for split, per_class in (("train", fashion_mnist.SUBSET_TRAIN), ("t10k", fashion_mnist.SUBSET_TEST)):
        images, labels = fashion_mnist.load_split(subset.folder, split)
        assert images.shape[1:] == (28, 28) and np.bincount(labels).tolist() == [per_class] * 10
    if fashion_mnist.DEBIAN_DIR.exists():  # the subset = the full set's first images of each class
        full, full_labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "t10k")
        images, labels = fashion_mnist.load_split(subset.folder, "t10k")
        first = np.sort(np.concatenate([np.flatnonzero(full_labels == c)[:150] for c in range(10)]))
        np.testing.assert_array_equal(images, full[first])


def test_find_prefers_a_users_copy_then_the_full_set(monkeypatch, tmp_path):
    _idx_folder(tmp_path / "copy")
    monkeypatch.setenv(fashion_mnist.ENV, str(tmp_path / "copy"))
    assert fashion_mnist.find() == fashion_mnist.FashionMnist(tmp_path / "copy", "copy")
    monkeypatch.setenv(fashion_mnist.ENV, str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="REPA_FASHION_MNIST"):
        fashion_mnist.find()
