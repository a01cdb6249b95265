"""`repa prepare` sources: an ImageNet-style tree ``<class>/<image>``, as a folder or a tar, on any URL;
or IDX files (MNIST, Fashion-MNIST; ``repa.data.prepare.idx``).

A source lists its images as ``SourceFile``s (classes sorted, labels = sorted class index, file
names sorted, as the reference) and reads one image's bytes; see docs/data.md, "How the images
stage works", step 1.
"""

from __future__ import annotations

import dataclasses
import logging
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

from repa import storage
from repa.data.prepare.idx import IdxSource, is_idx_source
from repa.data.prepare.report import PrepareError
from repa.data.prepare.source_file import SourceFile

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderSource",
    "IdxSource",
    "Source",
    "SourceFile",
    "TarSource",
    "open_source",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _build_files(
    per_class: dict[str, list[SourceFile]], url: str, max_per_class: int | None
) -> list[SourceFile]:
    """Sorted classes, sorted names, labels = sorted class index; optional per-class cap."""
    if not per_class:
        raise PrepareError(
            f"{url}: no class folders found (expected <class>/<image>.JPEG, "
            "e.g. ILSVRC train/n01440764/*.JPEG)"
        )
    files = []
    for label, name in enumerate(sorted(per_class)):
        entries = sorted(per_class[name], key=lambda f: f.rel)
        if not entries:
            raise PrepareError(f"{url}: class folder {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        if max_per_class is not None:
            entries = entries[:max_per_class]
        files.extend(dataclasses.replace(f, label=label) for f in entries)
    return files


class FolderSource:
    """``root/<class>/<image>`` on any fsspec URL; ``root/train/<class>/...`` is found too (ILSVRC)."""

    def __init__(
        self,
        where: str | storage.Location,
        *,
        max_per_class: int | None = None,
        num_threads: int = 8,
    ) -> None:
        url = storage.locate(where)
        entries = storage.list_entries(url)
        dirs = [e.name for e in entries if e.is_dir and not e.name.startswith(".")]
        if dirs == ["train"] or ("train" in dirs and {"val", "test"} & set(dirs)):
            logger.info("%s: using its train/ folder (ILSVRC layout)", url)
            url = storage.join(url, "train")
            entries = storage.list_entries(url)
            dirs = [e.name for e in entries if e.is_dir and not e.name.startswith(".")]
        self.location = url
        self.url = str(url)

        def list_class(name: str) -> list[SourceFile]:
            found = storage.list_entries(storage.join(url, name))
            return [SourceFile(f"{name}/{e.name}", -1) for e in found if not e.is_dir and _is_image(e.name)]

        with ThreadPoolExecutor(max(1, num_threads)) as pool:  # object stores: one LIST per class
            listed = dict(zip(dirs, pool.map(list_class, dirs)))
        self.files = _build_files(listed, self.url, max_per_class)
        self.class_names = tuple(sorted(listed))

    def read(self, f: SourceFile) -> bytes:
        return storage.read_bytes(storage.join(self.location, f.rel))

    def close(self) -> None:
        pass


class TarSource:
    """A ``.tar`` of the class tree (``[prefix/]<class>/<image>``) or of per-class tars (``<class>.tar``,
    the layout of ILSVRC2012_img_train.tar). Members are indexed once by scanning headers, then read
    by byte range, so workers read only their own images (local disk: cheap; object stores: the
    scan streams the file once per worker, so prefer an extracted folder there for large N).
    """

    def __init__(self, where: str | storage.Location, *, max_per_class: int | None = None) -> None:
        self.url = url = str(where)
        fs, path = storage.filesystem(where, operation="read")
        self._file = storage.retry(lambda: fs.open(path, "rb"), what=url, operation="read")
        self._lock = threading.Lock()
        per_class: dict[str, list[SourceFile]] = {}
        depths: set[int] = set()
        try:
            with tarfile.open(fileobj=self._file, mode="r:") as outer:
                for member in outer:
                    if not member.isfile():
                        continue
                    parts = [p for p in member.name.split("/") if p not in ("", ".")]
                    if not parts or parts[-1].startswith("."):
                        continue
                    if len(parts) == 1 and parts[0].lower().endswith(".tar"):  # <class>.tar
                        name = parts[0][: -len(".tar")]
                        inner_file = outer.extractfile(member)
                        with tarfile.open(fileobj=inner_file, mode="r:") as inner:
                            per_class[name] = [
                                SourceFile(
                                    f"{name}/{m.name.rsplit('/', 1)[-1]}",
                                    -1,
                                    member.offset_data + m.offset_data,
                                    m.size,
                                )
                                for m in inner
                                if m.isfile() and _is_image(m.name.rsplit("/", 1)[-1])
                            ]
                    elif len(parts) >= 2 and _is_image(parts[-1]):
                        depths.add(len(parts))
                        rel = f"{parts[-2]}/{parts[-1]}"
                        per_class.setdefault(parts[-2], []).append(
                            SourceFile(rel, -1, member.offset_data, member.size)
                        )
        except tarfile.TarError as e:
            self._file.close()
            raise PrepareError(f"{url}: not a readable tar ({e})") from e
        if len(depths) > 1:
            self._file.close()
            raise PrepareError(
                f"{url}: images at different folder depths {sorted(depths)}; "
                "expected one <class>/<image> level"
            )
        rels = [f.rel for files in per_class.values() for f in files]
        if len(rels) != len(set(rels)):
            self._file.close()
            raise PrepareError(f"{url}: the same <class>/<image> appears twice in the tar")
        self.files = _build_files(per_class, url, max_per_class)
        self.class_names = tuple(sorted(per_class))

    def read(self, f: SourceFile) -> bytes:
        def read() -> bytes:
            with self._lock:  # one shared handle: seek + read must not interleave between threads
                self._file.seek(f.offset)
                return self._file.read(f.size)

        data = storage.retry(read, what=f"{self.url}:{f.rel}")
        if len(data) != f.size:
            raise PrepareError(f"{self.url}: member {f.rel} is truncated ({len(data)} of {f.size} bytes)")
        return data

    def close(self) -> None:
        self._file.close()


Source = FolderSource | TarSource | IdxSource


def open_source(
    source: str | storage.Location,
    *,
    max_per_class: int | None = None,
    num_threads: int = 8,
) -> Source:
    """An IdxSource (IDX files), a TarSource (``*.tar``) or a FolderSource of a URL or Location;
    PrepareError if missing or without class folders."""
    source_url = str(source)
    if not storage.exists(source):
        raise PrepareError(f"{source_url}: source not found")
    if source_url.rstrip("/").lower().endswith(".tar"):  # by name first: is_idx_source lists a folder
        return TarSource(source, max_per_class=max_per_class)
    where = storage.locate(source)
    if is_idx_source(where):
        return IdxSource(where, max_per_class=max_per_class)
    return FolderSource(source, max_per_class=max_per_class, num_threads=num_threads)
