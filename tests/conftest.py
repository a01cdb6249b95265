"""Shared pytest fixtures.

S3 (a real local S3-compatible server, never a mock of boto):

- ``s3_server`` (session): starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 with a free port
  and sets ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION`` (restored afterwards), so ``s3://`` URLs work through ``repa.storage``
  (s3fs/botocore read the endpoint from the environment). Yields the endpoint URL. s3fs caches
  filesystem instances per options; the fixture clears that cache on start and stop, so instances
  made before/after the server cannot point at a stale endpoint.
- ``s3_bucket``: a fresh, empty bucket per test on that server; returns ``"s3://<name>"``.

GCS (``gcp-storage-emulator``, the pure-Python GCS JSON API server, in-memory, on 127.0.0.1;
``tests/support/gcs_emulator.py``):

- ``gcs_server`` (session): starts it on a free port and sets ``STORAGE_EMULATOR_HOST`` (gcsfs's
  endpoint), ``FSSPEC_GS_TOKEN=anon`` (anonymous access, also for subprocesses; the running
  process's fsspec config gets the same), ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (else the first
  bucket access hangs ~60 s) and ``NO_GCE_CHECK`` (no metadata-server probe); yields the endpoint.
- ``gcs_bucket``: a fresh, empty bucket per test; returns ``"gs://<name>"``.

Synthetic ImageNet sources live in ``tests/support/datasets.py`` (a plain module):
``make_imagenet_tree(tmp_path, synsets=..., per_class=4, corrupt=2)`` writes
``imagenet/train/<synset>/*.JPEG`` with varied sizes/modes plus corrupt files and returns an
``ImageNetTree(root, class_names, good, corrupt)``; ``make_imagenet_tar(tree, path, nested=False)``
tars it (``nested=True``: one ``<synset>.tar`` per class, the ILSVRC2012_img_train.tar layout).
The ``imagenet_tree`` fixture is ``make_imagenet_tree(tmp_path)`` with the defaults.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.datasets import ImageNetTree, make_imagenet_tree

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _clear_s3fs_cache() -> None:
    try:
        import s3fs
    except ImportError:  # pragma: no cover - s3fs is a dependency, but keep other tests runnable
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A local moto S3 server for the whole session; yields its endpoint URL (env set, then restored)."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**_S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}.items():
            mp.setenv(name, value)
        # Credentials files or a profile on the machine must not override the fake credentials.
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        _clear_s3fs_cache()
        try:
            yield endpoint
        finally:
            _clear_s3fs_cache()
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the session's moto server; returns ``s3://<name>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def _clear_gcsfs_cache() -> None:
    try:
        import gcsfs
    except ImportError:  # pragma: no cover - gcsfs is a dependency
        return
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """A local GCS emulator for the whole session (tests/support/gcs_emulator.py); yields its endpoint URL
    (env set, then restored)."""
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is needed for GCS tests")
    import fsspec.config

    from tests.support import gcs_emulator

    server, endpoint = gcs_emulator.start()
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        "FSSPEC_GS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "True",
    }
    before = dict(fsspec.config.conf.get("gs", {}))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
        _clear_gcsfs_cache()
        try:
            yield endpoint
        finally:
            _clear_gcsfs_cache()
            fsspec.config.conf["gs"] = before
            server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: str) -> str:
    """A new empty bucket on the session's GCS emulator; returns ``gs://<name>``."""
    from repa import storage

    name = f"test-{uuid.uuid4().hex[:16]}"
    fs, _ = storage.filesystem(f"gs://{name}")
    fs.mkdir(name)
    return f"gs://{name}"


@pytest.fixture
def imagenet_tree(tmp_path: Path) -> ImageNetTree:
    """3 synsets x 4 images (varied sizes, grayscale, CMYK, a PNG named .JPEG) + 2 corrupt files."""
    return make_imagenet_tree(tmp_path)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test (two shared cores: OpenMP threads spinning against other jobs
    make tiny forwards ~30x slower); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def feats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts the tiny extractor module (``tests.support.tiny_features.FEATS``) on sys.path; returns its folder
    (for a subprocess's PYTHONPATH)."""
    from tests.support.tiny_features import write_feature_module

    folder = write_feature_module(tmp_path / "feats")
    monkeypatch.syspath_prepend(str(folder))
    return folder


# ---- evaluation tests (tests/unit/test_{stats,images,features,refstats,metrics}.py)


@pytest.fixture(scope="module")
def eval_single_thread() -> Iterator[None]:
    """One thread for torch and BLAS/LAPACK while a module runs (``tests.support.eval_helpers``);
    ``pytestmark = pytest.mark.usefixtures("eval_single_thread")``."""
    from tests.support.eval_helpers import one_thread_everywhere

    with one_thread_everywhere():
        yield


@pytest.fixture(scope="module")
def weights_path() -> str:
    """Random-weights Inception file for torch-fidelity, built once per test process (~91 MiB)."""
    from tests.support.fidelity_weights import random_inception_weights_path

    return random_inception_weights_path()


@pytest.fixture(scope="module")
def inception(weights_path: str):
    """torch-fidelity's Inception feature extractor with ``weights_path``, on CPU."""
    from repa.eval import build_inception

    return build_inception(weights_path, device="cpu")


@pytest.fixture()
def toy():
    """A tiny deterministic feature extractor (``tests.support.eval_helpers.ToyClassifier``)."""
    from tests.support.eval_helpers import ToyClassifier

    return ToyClassifier()


@pytest.fixture
def s3_proxy(s3_server: str):
    """A ``tests.support.netproxy.NetProxy`` in front of the session's moto server (drop / blackhole /
    throttle); point ``client_kwargs.endpoint_url`` at ``s3_proxy.url`` to go through it."""
    from urllib.parse import urlparse

    from tests.support.netproxy import NetProxy

    target = urlparse(s3_server)
    proxy = NetProxy(target.hostname or "127.0.0.1", target.port or 80)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def reference(tmp_path: Path, feats: Path) -> str:
    """Reference statistics of 32 random 16x16 images under the tiny extractor (``feats``)."""
    import numpy as np

    from repa.eval.refstats import compute_reference_stats, save_reference_stats

    url = str(tmp_path / "ref.npz")
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    save_reference_stats(url, compute_reference_stats(images, __import__("repa_test_feats").build()))
    return url
