"""`repa prepare`, `repa train` and `repa watch` on GCS: the S3 tests that apply, against a real GCS
JSON-API server (``gcp-storage-emulator`` on 127.0.0.1, started by the ``gcs_server`` fixture in
tests/conftest.py), through gcsfs and ``repa.storage`` as in production (docs/architecture.md,
"Storage is the only interface").

- prepare: shards written to ``gs://`` are byte-identical to local ones and verify; a source tree on
  ``gs://`` is read through fsspec;
- train: data, checkpoints and TensorBoard on ``gs://``; stopped and resumed from the bucket, the run is
  bit-identical to an uninterrupted local one and its TensorBoard curve has every step once;
- train with the endpoint only in the config (``storage_options: {endpoint_url, token: anon}``, no
  ``STORAGE_EMULATOR_HOST``): data, encoder and VAE weights, checkpoints and TensorBoard all reached;
- watch: each committed checkpoint evaluated once, results, samples.npz and TensorBoard in the bucket.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml

from repa import checkpoint as ckpt
from repa import storage
from repa.cli import main as repa_main
from repa.config import RunConfig
from repa.data import prepare
from repa.data.prepare import prepare_images, prepare_latents
from repa.tensorboard import read_scalars
from tests.support.datasets import make_imagenet_tree
from tests.support.tiny_features import FEATS
from tests.support.tiny_runs import (
    TINY_TRAIN_SETS,
    commit_tiny_checkpoint,
    latent_run_sets,
    stage_latent_run,
    tiny_run_config,
    upload_folder,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(url: str) -> dict[str, bytes]:
    """Shards, sidecars and the manifest under url (name -> bytes); temporaries excluded."""
    return {
        n: storage.read_bytes(storage.join(url, n))
        for n in storage.listdir(url)
        if n.endswith((".tar", ".json")) and not n.startswith(".")
    }


def _prepare(src: str, out: str) -> prepare.PrepareSummary:
    return prepare_images(src, out, resolution=16, samples_per_shard=5, max_bad_fraction=0.5, num_workers=2)


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_output_on_gcs_is_byte_identical_to_local_and_verifies(imagenet_tree, tmp_path, gcs_bucket):
    reference = f"file://{tmp_path}/out"
    _prepare(str(imagenet_tree.root), reference)
    url = f"{gcs_bucket}/imagenet-16"
    _prepare(str(imagenet_tree.root), url)
    assert _files(url) == _files(reference)
    assert prepare.verify_dataset(url).num_samples == len(imagenet_tree.good)


def test_prepare_source_on_gcs_is_read_through_fsspec(imagenet_tree, tmp_path, gcs_bucket):
    upload_folder(imagenet_tree.root, f"{gcs_bucket}/src/train")
    _prepare(str(imagenet_tree.root), f"file://{tmp_path}/local")
    _prepare(f"{gcs_bucket}/src/train", f"{gcs_bucket}/out")
    shards = {n: b for n, b in _files(f"{gcs_bucket}/out").items() if n.endswith(".tar")}
    assert shards and shards == {n: b for n, b in _files(f"{tmp_path}/local").items() if n.endswith(".tar")}


# ---------------------------------------------------------------------------------------------- train

# tests/integration/test_train.py's tiny run: 16 px pixels, SiT hidden 32 x depth 2, a tiny timm ViT.
TINY = [
    *TINY_TRAIN_SETS,
    "log.every_steps=2",
    "log.tensorboard_flush_every_steps=4",
    "log.sample_every_steps=4",
    "log.sample_num_images=2",
    "log.sample_num_steps=2",
    "checkpoint.every_steps=4",
]


def _train(data_url: str, run_url: str, *extra: str) -> int:
    sets = [*TINY, f"data.url={data_url}", f"storage.run_url={run_url}", *extra]
    return repa_main(["train", "--config", "toy-cpu", *[a for s in sets for a in ("--set", s)]])


def _final_state(run_url: str, options: dict | None = None) -> dict:
    ref = ckpt.latest_checkpoint(storage.Location(run_url, options or {}))
    assert ref is not None
    return ckpt.load_checkpoint_state(ref)


def test_train_on_gcs_resumes_from_the_bucket_bit_identically(tmp_path, gcs_bucket, caplog):
    tree = make_imagenet_tree(tmp_path, per_class=6, corrupt=0)
    data_url = f"{gcs_bucket}/shards"
    prepare_images(str(tree.root), data_url, resolution=16, samples_per_shard=4)
    prepare_latents(data_url, vae="none", batch_size=8)
    local_data = f"file://{tmp_path}/shards"
    prepare_images(str(tree.root), local_data, resolution=16, samples_per_shard=4)
    prepare_latents(local_data, vae="none", batch_size=8)

    straight, run_url = f"file://{tmp_path}/straight", f"{gcs_bucket}/run"
    assert _train(local_data, straight, "train.max_steps=8") == 0
    # An uncommitted folder from a "crashed save" at a later step: must never be loaded.
    storage.write_bytes_atomic(f"{run_url}/checkpoints/step-9000000/state.pt", b"partial")
    assert _train(data_url, run_url, "train.max_steps=4") == 0
    with caplog.at_level("INFO", logger="repa.train.trainer"):
        assert _train(data_url, run_url, "train.max_steps=8") == 0  # a new process resumes from the bucket
    assert f"resumed from {run_url}/checkpoints/step-0000004" in caplog.text

    committed, _ = ckpt.list_checkpoints(run_url)
    assert [r.step for r in committed] == [4, 8]
    a, b = _final_state(straight), _final_state(run_url)
    assert a["step"] == b["step"] == 8 and a["reader"]["samples_consumed"] == b["reader"]["samples_consumed"]
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    scalars = read_scalars(f"{run_url}/tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8]
    assert storage.exists(f"{run_url}/config.yaml")


def test_gcs_endpoint_given_only_in_the_config_reaches_data_weights_and_checkpoints(
    gcs_server, gcs_bucket, tmp_path, monkeypatch
):
    """A private endpoint (emulator, on-prem gateway) lives in storage_options, not in the environment:
    the weights (checked before the run, then loaded) must be read through the same options."""
    import fsspec.config
    import gcsfs

    stage_latent_run(tmp_path, gcs_bucket)  # while the env endpoint is set

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.delenv("FSSPEC_GS_TOKEN")
    monkeypatch.setitem(fsspec.config.conf, "gs", {})
    monkeypatch.setenv("REPA_CACHE_DIR", str(tmp_path / "cache"))
    gcsfs.GCSFileSystem.clear_instance_cache()
    options = f"{{endpoint_url: '{gcs_server}', token: anon}}"
    run_url = f"{gcs_bucket}/run"
    sets = latent_run_sets(gcs_bucket, options)
    try:
        assert repa_main(["train", "--config", "toy-cpu", *[a for s in sets for a in ("--set", s)]]) == 0
        with_options = {"endpoint_url": gcs_server, "token": "anon"}
        state = _final_state(run_url, with_options)
        assert state["step"] == 2
        assert state["config"]["encoder"]["weights_urls"] == [f"{gcs_bucket}/weights/encoder.pt"]
        assert "train/loss" in read_scalars(storage.Location(f"{run_url}/tensorboard", with_options))
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()  # no instance bound to these options outlives the test


# ---------------------------------------------------------------------------------------------- watch


def test_watch_on_gcs_writes_results_samples_and_tensorboard_to_the_bucket(
    tmp_path, reference, gcs_bucket, capsys
):
    run_url = f"{gcs_bucket}/runs/tiny"
    tree = tiny_run_config(
        run_url,
        sample={"num_samples": 8, "num_steps": 3, "batch_size_per_device": 8, "save_npz": True},
        train={"max_steps": 1000},
        checkpoint={"every_steps": 100, "keep_every_steps": 0},
        log={"every_steps": 100},
        eval={"reference_stats_url": reference, "watch_poll_seconds": 1},
    )
    cfg = RunConfig.from_dict(tree)
    for step in (100, 200):
        commit_tiny_checkpoint(cfg, step, seed=step)
    storage.write_bytes_atomic(f"{run_url}/checkpoints/step-0000300/state.pt", b"uncommitted")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    argv = ["watch", "--config", str(cfg_path), "--once", "--feature-extractor", FEATS, "--chunk-size", "4"]
    assert repa_main([*argv, "--no-progress"]) == 0
    assert "2 checkpoint(s) handled [100, 200]" in capsys.readouterr().out
    for step in (100, 200):
        (name,) = storage.listdir(f"{run_url}/eval/step-{step:07d}")
        result = json.loads(storage.read_bytes(f"{run_url}/eval/step-{step:07d}/{name}"))
        samples_url = result["protocol"]["samples_url"]
        assert samples_url.startswith(f"{run_url}/samples/step-{step:07d}-")
        with np.load(io.BytesIO(storage.read_bytes(f"{samples_url}/samples.npz"))) as npz:
            assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
        assert not [n for n in storage.listdir(samples_url) if n.startswith(".tmp-")]
    assert [s for s, _ in read_scalars(f"{run_url}/tensorboard/eval")["eval/fd_tiny-conv"]] == [100, 200]
    assert repa_main([*argv, "--no-progress"]) == 0
    assert "0 checkpoint(s) handled" in capsys.readouterr().out
