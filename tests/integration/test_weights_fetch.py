"""`repa weights fetch` and ``hf://`` URLs against a fake Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT).

The fake Hub (tests/support/fake_hub.py) serves the Hub's file endpoints with a tiny timm DINOv2 repo, tiny
SD-VAE diffusers folders and, as plain URLs, an Inception weights file and a reference batch. The CLI
runs in subprocesses, so huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE as a user's
shell sets them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from repa import storage
from tests.support.fake_hub import FakeHub
from tests.support.tiny_runs import TINY_SD_VAE

DINO = "timm/vit_base_patch14_dinov2.lvd142m"


def _vae_folder(tmp_path: Path, name: str) -> dict[str, bytes]:
    from repa.vae import build_vae

    out = tmp_path / "vae-src" / name
    build_vae(name, config_overrides=TINY_SD_VAE).save_pretrained(str(out))
    return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".safetensors")}


@pytest.fixture(scope="module")
def content(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    import torch
    from safetensors.torch import save

    tmp = tmp_path_factory.mktemp("hub-content")
    rng = np.random.default_rng(0)
    ref = io.BytesIO()
    np.savez(ref, mu=rng.standard_normal(8), sigma=np.eye(8))
    return {
        # 13.5 MB: more than one of huggingface_hub's 10 MiB download chunks, so a cut can be resumed
        DINO: {"model.safetensors": save({"w": torch.from_numpy(rng.standard_normal((1300, 1300)))})},
        "stabilityai/sd-vae-ft-mse": _vae_folder(tmp, "sd-vae-ft-mse"),
        "stabilityai/sd-vae-ft-ema": _vae_folder(tmp, "sd-vae-ft-ema"),
        "files": {"inception": rng.bytes(300_000), "reference": ref.getvalue()},
    }


@pytest.fixture
def hub(content, tmp_path):
    with FakeHub() as hub:
        for repo, files in content.items():
            if repo != "files":
                hub.add_repo(repo, files)
        data = content["files"]["inception"]
        prefix = hashlib.sha256(data).hexdigest()[:8]  # torch.hub's convention: name-<sha256 prefix>.ext
        hub.inception_url = hub.add_file(f"weights-inception-test-{prefix}.pth", data)
        hub.reference_url = hub.add_file("VIRTUAL_imagenet256_labeled.npz", content["files"]["reference"])
        hub.env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1",
        }
        hub.env.pop("HF_HUB_OFFLINE", None)
        yield hub


def _fetch(hub: FakeHub, dest: str, *extra: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**hub.env, **({"HF_HUB_OFFLINE": "1"} if offline else {})}
    cmd = [sys.executable, "-m", "repa", "weights", "fetch", dest, "-c", "sit-xl-2-repa", "--no-progress"]
    cmd += ["--mirror", f"inception={hub.inception_url}", "--mirror", f"adm-reference={hub.reference_url}"]
    return subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=300)


def _sets(stdout: str) -> list[str]:
    return [tok for line in stdout.splitlines() if line.startswith("--set") for tok in shlex.split(line)]


def test_fetch_stages_verifies_resumes_caches_and_prints_set_lines(hub, content, tmp_path, s3_bucket):
    dest = tmp_path / "weights"
    safetensors = f"/{DINO}/resolve/main/model.safetensors"
    hub.cut_once(safetensors, after=12_000_000)  # the connection drops mid-file: resumed with a Range GET

    out = _fetch(hub, str(dest), "--reference-batch")
    assert out.returncode == 0, out.stderr
    ranges = [r for p, r in hub.downloads("model.safetensors") if p == safetensors]
    assert ranges[0] is None and ranges[1] and int(ranges[1][6:-1]) > 0, ranges  # bytes=N-
    manifest = json.loads((dest / "weights-manifest.json").read_text())["files"]
    for repo in (DINO, "stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema"):
        for name, data in content[repo].items():
            entry = manifest[f"{repo}/{name}"]
            assert (dest / repo / name).read_bytes() == data  # complete, also the interrupted one
            assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
            assert entry["source"] == f"hf://{repo}@{hub.commit(repo)}/{name}"
    inception = manifest[f"torch-fidelity/{hub.inception_url.rsplit('/', 1)[-1]}"]
    assert inception["sha256"] == hashlib.sha256(content["files"]["inception"]).hexdigest()

    # The printed --set lines configure an evaluation of the paper preset.
    sets = _sets(out.stdout)
    validate = [sys.executable, "-m", "repa", "config", "validate", "-c", "sit-xl-2-repa", "--for", "eval"]
    check = subprocess.run([*validate, *sets], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    keys = sorted(s.split("=", 1)[0] for s in sets if s != "--set")
    assert keys == [
        "encoder.weights_urls",
        "eval.inception_weights_url",
        "eval.reference_stats_url",
        "sample.vae_weights_url",
        "vae.weights_url",
    ]
    from repa.config import load_config
    from repa.eval.sample import build_decoder_vae

    vae, identity = build_decoder_vae(load_config("sit-xl-2-repa", sets[1::2]))  # the staged folder loads
    assert identity["weights_url"] == str(dest / "stabilityai/sd-vae-ft-ema") and vae.weights_url

    # Again: everything is already there, nothing is requested.
    before = len(hub.requests)
    again = _fetch(hub, str(dest), "--reference-batch")
    assert again.returncode == 0 and _sets(again.stdout) == sets
    assert len(hub.requests) == before and "already at" in again.stderr

    # Another destination (S3), offline: served from the Hugging Face cache under HF_HOME.
    offline = _fetch(hub, f"{s3_bucket}/weights", "--reference-batch", offline=True)
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == before
    remote = f"{s3_bucket}/weights/stabilityai/sd-vae-ft-ema/diffusion_pytorch_model.safetensors"
    ema = content["stabilityai/sd-vae-ft-ema"]
    assert storage.read_bytes(remote) == ema["diffusion_pytorch_model.safetensors"]
    assert Path(hub.env["HF_HOME"], "hub").is_dir()


def test_a_file_whose_hash_does_not_match_is_refused(hub, content, tmp_path):
    dest = tmp_path / "weights"
    bad = "/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors"
    hub.bad_etag.add(bad)
    out = _fetch(hub, str(dest), "--only", "sd-vae-ft-ema")
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()[-1:]
    assert line.startswith("repa weights fetch: error:") and "does not match the Hub's ETag" in line
    assert not (dest / "stabilityai/sd-vae-ft-ema/diffusion_pytorch_model.safetensors").exists()
    blobs = Path(hub.env["HF_HOME"], "hub", "models--stabilityai--sd-vae-ft-ema", "blobs")
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() != p.name for p in blobs.iterdir())  # none kept

    # a URL whose name promises another sha256 prefix than its content
    wrong = hub.add_file("weights-inception-test-deadbeef.pth", content["files"]["inception"])
    out = _fetch(hub, str(dest), "--only", "inception", "--mirror", f"inception={wrong}")
    assert out.returncode == 2 and "does not start with deadbeef" in out.stderr
    assert not (dest / "torch-fidelity").exists()


def test_hf_urls_are_read_through_the_hugging_face_cache(hub, content, tmp_path, monkeypatch):
    for key in ("HF_ENDPOINT", "HF_HOME"):
        monkeypatch.setenv(key, hub.env[key])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    url = f"hf://{DINO}/model.safetensors"
    assert storage.read_bytes(url) == content[DINO]["model.safetensors"]
    local = storage.local_copy(url)
    assert local.startswith(hub.env["HF_HOME"])  # the Hugging Face cache itself, no second copy
    assert Path(local).read_bytes() == content[DINO]["model.safetensors"]

    from repa.vae import build_vae

    vae = build_vae("sd-vae-ft-ema", "hf://stabilityai/sd-vae-ft-ema")  # a folder: its json + safetensors
    assert vae.weights_url == "hf://stabilityai/sd-vae-ft-ema"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    assert storage.read_bytes(url) == content[DINO]["model.safetensors"]  # from the cache, no request
    build_vae("sd-vae-ft-ema", "hf://stabilityai/sd-vae-ft-ema")
    assert len(hub.requests) == before
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError, match=f"hf://{DINO}/missing.safetensors"):
        storage.read_bytes(f"hf://{DINO}/missing.safetensors")
