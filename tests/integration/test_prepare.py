"""`repa prepare` end to end on real storage: local files, fsspec memory, and S3 (a moto server).

Small synthetic ImageNet trees (tests/support/datasets.py) at 16 px keep every test to a second or two.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from repa import storage
from repa.data import format as fmt
from repa.data import prepare
from repa.data.prepare import images as images_stage
from repa.data.prepare import latents as latents_stage
from tests.support.datasets import ImageNetTree, make_imagenet_tar, make_imagenet_tree

RES = 16
SPS = 5  # samples per shard: 14 source files -> 3 shards


def _prepare(src, out: str, **kw) -> prepare.PrepareSummary:
    kw.setdefault("resolution", RES)
    kw.setdefault("samples_per_shard", SPS)
    kw.setdefault("max_bad_fraction", 0.5)
    kw.setdefault("num_workers", 2)
    return prepare.prepare_images(str(src), out, **kw)


def _files(url: str) -> dict[str, bytes]:
    """Every shard, sidecar and manifest under url (name -> bytes); temporaries excluded."""
    return {
        n: storage.read_bytes(storage.join(url, n))
        for n in storage.listdir(url)
        if n.endswith((".tar", ".json")) and not n.startswith(".")
    }


def _shards(url: str) -> dict[str, bytes]:
    return {n: b for n, b in _files(url).items() if n.endswith(".tar")}


def _samples(url: str, manifest: fmt.Manifest, **kw) -> list[fmt.Sample]:
    out = []
    for info in manifest.shards:
        data = storage.read_bytes(storage.join(url, info.name))
        out.extend(fmt.iter_shard(io.BytesIO(data), name=info.name, expected_keys=info.keys(), **kw))
    return out


@pytest.fixture
def memory_url():
    url = f"memory://prepare-{uuid.uuid4().hex}"
    yield url
    storage.remove(url, recursive=True)


# ----------------------------------------------------------------------------------------------
# images stage
# ----------------------------------------------------------------------------------------------


def test_prepare_images_writes_shards_and_manifest_with_sorted_synset_labels(imagenet_tree, tmp_path):
    out = f"file://{tmp_path}/out"
    summary = _prepare(imagenet_tree.root, out)
    m = fmt.read_manifest(out)
    assert summary.manifest == m and summary.shards_written == 3 == len(m.shards)
    assert m.num_samples == len(imagenet_tree.good) and m.class_names == imagenet_tree.class_names
    assert (
        m.crop == "adm-center" and m.resolution == RES and m.vae is None and m.created_by.startswith("repa ")
    )
    sources = {}
    for i in range(3):
        side = json.loads(storage.read_bytes(storage.join(out, fmt.sidecar_name(i))))
        sources.update(side["sources"])
    samples = _samples(out, m)
    assert len({s["key"] for s in samples}) == len(samples) == m.num_samples
    labels_seen = set()
    for s in samples:
        synset = sources[s["key"]].split("/")[0]
        assert s["label"] == imagenet_tree.class_names.index(synset)  # label = sorted synset index
        assert fmt.decode_png(s["png"]).shape == (3, RES, RES)
        labels_seen.add(s["label"])
    assert labels_seen == {0, 1, 2}
    by_key = {s["key"]: s["label"] for s in samples}
    per_shard_classes = [len(set(map(by_key.get, sh.keys()))) for sh in m.shards]
    assert max(per_shard_classes) > 1  # the global shuffle mixes classes within shards


def test_corrupt_images_are_skipped_and_named_in_the_summary(imagenet_tree, tmp_path):
    out = f"file://{tmp_path}/out"
    summary = _prepare(imagenet_tree.root, out)
    assert sorted(b.source for b in summary.bad_files) == sorted(imagenet_tree.corrupt)
    text = summary.format()
    for name in imagenet_tree.corrupt:
        assert name in text
    m = fmt.read_manifest(out)
    skipped = {s.source: s.key for sh in m.shards for s in sh.skipped}
    assert set(skipped) == set(imagenet_tree.corrupt)
    for sh in m.shards:  # skipped keys leave gaps; the listed keys are exactly the ones present
        keys = set(sh.keys())
        assert [s["key"] for s in _samples(out, m) if s["key"] in keys] == sh.keys()


def test_too_many_corrupt_images_fail_with_a_clear_error(imagenet_tree, tmp_path):
    out = f"file://{tmp_path}/out"
    with pytest.raises(prepare.PrepareError, match=r"unreadable, more than max_bad_fraction=0\.01") as e:
        _prepare(imagenet_tree.root, out, max_bad_fraction=0.01)
    assert any(name in str(e.value) for name in imagenet_tree.corrupt)
    assert not storage.exists(storage.join(out, fmt.MANIFEST_NAME))


@pytest.mark.parametrize("nested", [False, True], ids=["tree-tar", "tar-of-class-tars"])
def test_tar_source_gives_the_same_shards_as_the_folder(imagenet_tree, tmp_path, nested):
    _prepare(imagenet_tree.root, f"file://{tmp_path}/from-folder")
    tar = make_imagenet_tar(imagenet_tree, tmp_path / "train.tar", nested=nested)
    summary = _prepare(tar, f"file://{tmp_path}/from-tar")
    assert sorted(b.source for b in summary.bad_files) == sorted(imagenet_tree.corrupt)
    assert _files(f"{tmp_path}/from-tar") == _files(f"{tmp_path}/from-folder")


def test_output_to_file_memory_and_s3_is_byte_identical(imagenet_tree, tmp_path, memory_url, s3_bucket):
    reference = f"file://{tmp_path}/out"
    _prepare(imagenet_tree.root, reference)
    for url in (memory_url, f"{s3_bucket}/imagenet-16"):
        _prepare(imagenet_tree.root, url)
        assert _files(url) == _files(reference), url
        assert prepare.verify_dataset(url).num_samples == len(imagenet_tree.good)


def test_source_on_s3_is_read_through_fsspec(imagenet_tree, tmp_path, s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(imagenet_tree.root), f"{s3_bucket[5:]}/src/train", recursive=True)
    _prepare(imagenet_tree.root, f"file://{tmp_path}/local")
    _prepare(f"{s3_bucket}/src/train", f"{s3_bucket}/out")
    assert _shards(f"{s3_bucket}/out") == _shards(f"{tmp_path}/local")


def test_three_workers_produce_the_same_dataset_as_one(imagenet_tree, tmp_path):
    one = f"file://{tmp_path}/one"
    _prepare(imagenet_tree.root, one, worker_index=0, worker_count=1)
    three = f"file://{tmp_path}/three"
    for i in range(3):
        summary = _prepare(imagenet_tree.root, three, worker_index=i, worker_count=3)
        assert summary.shards_assigned == 1
        # Only the worker that completes the set writes the manifest.
        assert (summary.manifest is not None) == (i == 2)
    assert _files(three) == _files(one)


def test_worker_identity_comes_from_flags_indexed_job_or_torchrun_env():
    assert prepare.resolve_worker(env={}) == (0, 1)
    assert prepare.resolve_worker(env={"JOB_COMPLETION_INDEX": "2", "REPA_WORKER_COUNT": "4"}) == (2, 4)
    assert prepare.resolve_worker(worker_count=8, env={"JOB_COMPLETION_INDEX": "5"}) == (5, 8)
    assert prepare.resolve_worker(env={"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert prepare.resolve_worker(3, 4, env={"RANK": "1", "WORLD_SIZE": "2"}) == (3, 4)
    with pytest.raises(prepare.PrepareError, match="REPA_WORKER_COUNT"):
        prepare.resolve_worker(env={"JOB_COMPLETION_INDEX": "0"})
    with pytest.raises(prepare.PrepareError, match="worker index 4"):
        prepare.resolve_worker(4, 4)
    assert prepare.worker_shards(10, 1, 4) == [1, 5, 9]


def test_restart_after_crash_completes_without_rewriting_finished_shards(
    imagenet_tree, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    clean = tmp_path / "clean"
    _prepare(imagenet_tree.root, f"file://{clean}")

    # Crash while committing shard 1's sidecar: shard 0 is done, shard 1's tar exists without a sidecar.
    real = images_stage.write_sidecar

    def crash_on_second(url, shard, sidecar):
        if shard == 1:
            raise KeyboardInterrupt("simulated kill")
        real(url, shard, sidecar)

    monkeypatch.setattr(images_stage, "write_sidecar", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _prepare(imagenet_tree.root, f"file://{out}")
    monkeypatch.setattr(images_stage, "write_sidecar", real)
    assert (out / "shard-000001.tar").exists() and not (out / "shard-000001.json").exists()
    leftover = out / f".tmp-{'0' * 32}-shard-000002.tar"  # as a kill during write_bytes_atomic leaves
    leftover.write_bytes(b"partial")
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-000000.*")}

    summary = _prepare(imagenet_tree.root, f"file://{out}")
    assert (summary.shards_skipped, summary.shards_written) == (1, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-000000.*")} == done
    assert not leftover.exists()
    assert _files(str(out)) == _files(str(clean))

    again = _prepare(imagenet_tree.root, f"file://{out}")  # a finished run is a no-op
    assert (again.shards_written, again.shards_skipped) == (0, 3) and again.manifest is not None


def test_rerun_with_other_settings_into_the_same_output_is_refused(imagenet_tree, tmp_path):
    out = f"file://{tmp_path}/out"
    _prepare(imagenet_tree.root, out)
    with pytest.raises(prepare.PrepareError, match="already holds a dataset prepared with other"):
        _prepare(imagenet_tree.root, out, resolution=8)


def test_bad_sources_and_outputs_give_clear_errors(tmp_path):
    with pytest.raises(prepare.PrepareError, match="source not found"):
        _prepare(tmp_path / "nope", f"file://{tmp_path}/o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(prepare.PrepareError, match="no class folders found"):
        _prepare(tmp_path / "empty", f"file://{tmp_path}/o2")
    tree = make_imagenet_tree(tmp_path / "t", per_class=2, corrupt=0)
    (tree.root / "n09999999").mkdir()
    (tree.root / "n09999999" / "readme.txt").write_text("no images here")
    with pytest.raises(prepare.PrepareError, match="class folder 'n09999999' has no images"):
        _prepare(tree.root, f"file://{tmp_path}/o3")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(prepare.PrepareError, match="output not writable"):
        _prepare(make_imagenet_tree(tmp_path / "u", corrupt=0).root, f"file://{tmp_path}/a-file/out")


def test_max_per_class_takes_the_first_sorted_files(imagenet_tree, tmp_path):
    summary = _prepare(imagenet_tree.root, f"file://{tmp_path}/out", max_per_class=2)
    assert summary.manifest.num_samples == 6


def test_default_shard_size_targets_tens_of_megabytes_at_256px():
    per_sample = prepare.estimate_sample_bytes(256)
    assert 200_000 < per_sample < 230_000  # ~197 KB PNG + 16 KB float16 moments + tar headers
    n = prepare.DEFAULT_TARGET_SHARD_BYTES // per_sample
    assert 50e6 <= n * per_sample <= 100e6


# ----------------------------------------------------------------------------------------------
# latents stage
# ----------------------------------------------------------------------------------------------


def test_latents_with_vae_none_add_moments_joined_by_key(imagenet_tree, tmp_path):
    out = f"file://{tmp_path}/out"
    _prepare(imagenet_tree.root, out)
    summary = prepare.prepare_latents(out, vae="none", batch_size=3)
    m = summary.manifest
    assert m is not None and m == fmt.read_manifest(out)
    assert (m.vae, m.moments_dtype, m.moments_shape) == ("none", "float16", (6, RES, RES))
    samples = _samples(out, m, require_moments=True)
    assert len(samples) == m.num_samples
    for s in samples:  # identity VAE: moments = [x / 127.5 - 1, 0] of this very sample's image
        x = fmt.decode_png(s["png"]).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(s["moments"][:3].astype(np.float32), x, atol=1e-3)
        assert not s["moments"][3:].any()
    assert prepare.verify_dataset(out) == m
    again = prepare.prepare_latents(out, vae="none", batch_size=3)
    assert (again.shards_written, again.shards_skipped) == (0, 3)


def test_dropped_moments_member_is_reported_by_the_reader_not_misaligned(imagenet_tree, tmp_path):
    out = tmp_path / "out"
    _prepare(imagenet_tree.root, f"file://{out}")
    m = prepare.prepare_latents(f"file://{out}", vae="none", moments_dtype="float32").manifest
    info = m.shards[1]
    victim = info.keys()[1]
    buf = io.BytesIO()
    with tarfile.open(out / info.name) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for member in src.getmembers():
            if member.name != f"{victim}.moments.npy":
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(fmt.ShardError, match=rf"{info.name}: sample {victim}: missing member"):
        list(fmt.iter_shard(io.BytesIO(buf.getvalue()), name=info.name, require_moments=True))
    errors = []
    kept = list(
        fmt.iter_shard(
            io.BytesIO(buf.getvalue()), name=info.name, require_moments=True, on_error=errors.append
        )
    )
    assert len(errors) == 1 and victim not in {s["key"] for s in kept}
    for s in kept:  # every other sample still carries its own moments
        x = fmt.decode_png(s["png"]).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(s["moments"][:3], x, atol=1e-6)


def test_latents_restart_after_crash_between_shard_and_sidecar_commit(imagenet_tree, tmp_path, monkeypatch):
    out = f"file://{tmp_path}/out"
    _prepare(imagenet_tree.root, out)
    real = latents_stage._commit_pending

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(latents_stage, "_commit_pending", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_latents(out, vae="none")
    monkeypatch.setattr(latents_stage, "_commit_pending", real)
    assert not storage.exists(storage.join(out, fmt.MANIFEST_NAME))  # stale manifest removed up front
    summary = prepare.prepare_latents(out, vae="none")
    assert summary.shards_written == 2 and summary.shards_skipped == 1  # shard 0 only needed its sidecar
    assert prepare.verify_dataset(out).vae == "none"


def test_latents_accept_a_built_vae_object(imagenet_tree, tmp_path):
    pytest.importorskip("diffusers")
    from repa.vae import build_vae

    tiny = {
        "block_out_channels": [8, 8],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
    }
    vae = build_vae("sd-vae-ft-mse", config_overrides=tiny)
    out = f"file://{tmp_path}/out"
    _prepare(imagenet_tree.root, out, max_per_class=2)
    m = prepare.prepare_latents(out, vae=vae, batch_size=4).manifest
    assert m.vae == "sd-vae-ft-mse" and m.moments_shape == (8, RES // 2, RES // 2)
    assert m.vae_details["random_init"] is True
    prepare.verify_dataset(out)


def test_latents_refuse_a_named_vae_without_weights(imagenet_tree, tmp_path):
    out = f"file://{tmp_path}/out"
    _prepare(imagenet_tree.root, out, max_per_class=1)
    with pytest.raises(prepare.PrepareError, match="refusing to store moments of a randomly initialised"):
        prepare.prepare_latents(out, vae="sd-vae-ft-mse")


def test_latents_before_images_is_a_clear_error(tmp_path):
    with pytest.raises(prepare.PrepareError, match=r"no plan\.json; run `repa prepare images"):
        prepare.prepare_latents(f"file://{tmp_path}/nothing", vae="none")


# ----------------------------------------------------------------------------------------------
# verification: manifest vs shards
# ----------------------------------------------------------------------------------------------


def test_corrupted_or_swapped_shard_fails_verification_naming_the_shard(imagenet_tree, tmp_path):
    out = tmp_path / "out"
    _prepare(imagenet_tree.root, f"file://{out}")
    shard = out / "shard-000001.tar"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[2000] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(fmt.ShardError, match=r"shard-000001\.tar: sha256 .* but the manifest says"):
        prepare.verify_dataset(f"file://{out}")
    shard.write_bytes((out / "shard-000002.tar").read_bytes())
    with pytest.raises(fmt.ShardError, match=r"shard-000001\.tar: "):
        prepare.verify_dataset(f"file://{out}", check_samples=False)


def test_shard_with_fewer_samples_than_the_manifest_fails_naming_the_shard(imagenet_tree, tmp_path):
    out = tmp_path / "out"
    _prepare(imagenet_tree.root, f"file://{out}")
    m = fmt.read_manifest(f"file://{out}")
    info = m.shards[0]
    samples = _samples(f"file://{out}", fmt.Manifest(**{**m.__dict__, "shards": (info,)}))
    short = fmt.write_shard(samples[:-1])
    (out / info.name).write_bytes(short)
    doc = json.loads((out / "manifest.json").read_text())
    doc["total_bytes"] += len(short) - doc["shards"][0]["bytes"]
    doc["shards"][0].update(bytes=len(short), sha256=fmt.sha256_hex(short))  # checksums agree, count does not
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(fmt.ShardError, match=rf"shard-000000\.tar: sample {info.keys()[-1]}: missing"):
        prepare.verify_dataset(f"file://{out}")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_prepare_images_latents_verify(imagenet_tree, tmp_path, capsys):
    from repa.cli import main

    out = f"file://{tmp_path}/out"
    common = ["--samples-per-shard", "5", "--resolution", str(RES), "--no-progress"]
    rc = main(["prepare", "images", str(imagenet_tree.root), out, *common, "--max-bad-fraction", "0.5"])
    text = capsys.readouterr().out
    assert rc == 0 and "3 of 3 shards written" in text and imagenet_tree.corrupt[0] in text
    assert main(["prepare", "latents", out, "--vae", "none", "--no-progress"]) == 0
    assert main(["prepare", "verify", out]) == 0
    assert "agree with the manifest" in capsys.readouterr().out
    rc = main(["prepare", "images", str(tmp_path / "missing"), f"file://{tmp_path}/o2", "--no-progress"])
    assert rc == 3 and "source not found" in capsys.readouterr().err  # a missing input: exit 3


def test_indexed_job_env_splits_work_across_processes(imagenet_tree, tmp_path, monkeypatch):
    out = f"file://{tmp_path}/out"
    monkeypatch.setenv("REPA_WORKER_COUNT", "2")
    for i in (1, 0):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
        summary = _prepare(imagenet_tree.root, out)
        assert summary.worker_index == i and summary.shards_assigned == (2 if i == 0 else 1)
    assert summary.manifest is not None and summary.manifest.num_samples == len(imagenet_tree.good)


def test_helper_tree_has_the_documented_shape(tmp_path):
    tree: ImageNetTree = make_imagenet_tree(tmp_path, per_class=3, corrupt=1)
    assert tree.num_images == 10 and tree.root.name == "train"
    assert sorted(os.listdir(tree.root)) == list(tree.class_names)
    assert isinstance(make_imagenet_tar(tree, tmp_path / "x.tar"), Path)
