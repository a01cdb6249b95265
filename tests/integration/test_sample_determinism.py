"""`repa sample`: sample i depends only on (seed, i); chunks are atomic, resumable and rank-independent.

Real processes: a 2-process torchrun (gloo) and a SIGKILLed run are compared byte for byte with a
single in-process run (chunk files are deterministic .npz bytes). Tiny SiT on 16x16 pixels (vae
`none`), 4-step SDE with guidance, so every test runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from repa import checkpoint as ckpt
from repa.checkpoint import model_args_from_recorded
from repa.config import RunConfig
from repa.eval import sample as S
from repa.eval.args import resolve_config
from tests.support.tiny_runs import NUM_CLASSES, commit_tiny_checkpoint, tiny_run_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(run_url: str, **sample) -> dict:
    return tiny_run_config(
        run_url, sample={"num_samples": 12, "num_steps": 4, "batch_size_per_device": 5, **sample}
    )


def write_run(root: Path, step: int = 100, weights_seed: int = 0, **sample) -> tuple[str, str, RunConfig]:
    """A run folder with config.yaml and one committed checkpoint of a tiny random SiT; returns
    (config file, run_url, config)."""
    run_url = str(root / "run")
    cfg = RunConfig.from_dict(tiny_config(run_url, **sample))
    commit_tiny_checkpoint(cfg, step, seed=weights_seed)
    (root / "run" / "config.yaml").write_text(cfg.to_yaml())
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(run_url, **sample)))
    return str(cfg_path), run_url, cfg


def chunk_digests(out: str) -> dict[str, str]:
    folder = Path(out) / "chunks"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("chunk-*.npz"))}


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per chunk file: unchanged means not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "chunks").glob("chunk-*.npz")}


def cli(*argv: str) -> int:
    from repa.cli import main

    return main(list(argv))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ----------------------------------------------------------------------------------------------
# Per-sample inputs
# ----------------------------------------------------------------------------------------------


def test_inputs_of_a_sample_depend_only_on_seed_and_index():
    spec = S.SampleSpec(num_samples=20, seed=3, num_classes=NUM_CLASSES, num_steps=5)
    whole = S.sample_inputs(spec, range(10), (3, 4, 4))
    parts = [S.sample_inputs(spec, r, (3, 4, 4)) for r in (range(0, 3), range(3, 4), range(4, 10))]
    assert torch.equal(whole.y, torch.cat([p.y for p in parts]))
    assert torch.equal(whole.z, torch.cat([p.z for p in parts]))
    assert torch.equal(whole.noise, torch.cat([p.noise for p in parts], dim=1))
    assert whole.noise.shape == (4, 10, 3, 4, 4)  # (N-1 SDE steps, B, C, h, w)
    other_seed = S.sample_inputs(
        S.SampleSpec(num_samples=20, seed=4, num_classes=NUM_CLASSES), range(10), (3, 4, 4)
    )
    assert not torch.equal(whole.z, other_seed.z)


def test_sample_seeds_are_distinct_32_bit_values():
    seeds = [S.sample_seed(0, i) for i in range(50_000)]
    assert len(set(seeds)) == 50_000  # injective in i: no two samples of a run share noise
    assert all(0 <= s < 2**32 for s in seeds)  # torch's CPU generator keeps only 32 bits
    assert S.sample_seed(0, 0) != S.sample_seed(1, 0)


def test_class_balanced_labels_cycle_without_changing_the_noise():
    uniform = S.SampleSpec(num_samples=30, seed=0, num_classes=NUM_CLASSES, sampler="ode_euler")
    balanced = S.SampleSpec(
        num_samples=30, seed=0, num_classes=NUM_CLASSES, sampler="ode_euler", class_balanced=True
    )
    a, b = S.sample_inputs(uniform, range(30), (3, 2, 2)), S.sample_inputs(balanced, range(30), (3, 2, 2))
    assert b.y.tolist() == [i % NUM_CLASSES for i in range(30)]
    assert torch.equal(a.z, b.z) and a.noise is None
    assert len(set(a.y.tolist())) > 3  # uniform random labels


def test_sample_defaults_are_the_fid_1_42_protocol():
    """The paper's FID setting is the default (no separate preset to keep in sync with it)."""
    cfg = resolve_config(argparse.Namespace(config=None, overrides=[], checkpoint=None), checkpoint=False).cfg
    s = cfg.sample
    assert (s.sampler, s.num_steps, s.cfg_scale) == ("sde", 250, 1.8)
    assert (s.guidance_low, s.guidance_high, s.num_samples, s.class_balanced) == (0.0, 0.7, 50_000, False)


def test_shorthand_flags_become_config_keys():
    args = argparse.Namespace(
        config=None, overrides=["sample.seed=3"], checkpoint=None, chunk_size=7, precision="bf16", output=None
    )
    cfg = resolve_config(args, checkpoint=False).cfg
    assert (cfg.sample.chunk_size, cfg.sample.precision, cfg.sample.seed) == (7, "bf16", 3)
    assert cfg.sample_precision() == "bf16"
    assert S.SampleSpec.from_config(cfg).chunk_size == 7


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------


def test_two_processes_and_one_produce_byte_identical_chunks(tmp_path):
    cfg_path, _, _ = write_run(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert cli("sample", "--config", cfg_path, "--chunk-size", "4", "--output", one, "--no-progress") == 0
    proc = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                "repa",
            ),
            *("sample", "--config", cfg_path, "--chunk-size", "4", "--output", two, "--no-progress"),
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1: 4 images" in proc.stderr  # the second process really sampled (chunk 1 of 0, 1, 2)
    assert chunk_digests(one) == chunk_digests(two)
    assert len(chunk_digests(one)) == 3


def test_batch_size_changes_no_input_and_at_most_the_last_bit(tmp_path):
    _, run_url, cfg = write_run(tmp_path)
    loaded = ckpt.load_model(cfg, ckpt.resolve_checkpoint(None, run_url))
    vae, _ = S.build_decoder_vae(cfg)
    spec = dataclasses.replace(S.SampleSpec.from_config(cfg), chunk_size=6)
    sets = {
        bs: S.generate_samples(
            loaded.model, spec, out=str(tmp_path / f"bs{bs}"), vae=vae, batch_size=bs, latents_scale=1.0
        )
        for bs in (1, 4, 6)
    }
    images = {bs: np.concatenate(list(s.iter_images())) for bs, s in sets.items()}
    for bs in (1, 4):
        assert np.array_equal(sets[bs].labels(), sets[6].labels())
        diff = np.abs(images[bs].astype(int) - images[6].astype(int))
        # GEMM kernels sum in a batch-size dependent order (~1e-7 in the latents): a rare +-1 at most.
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert images[6].shape == (12, 16, 16, 3) and images[6].dtype == np.uint8


def test_resume_after_kill_recomputes_nothing_and_matches_a_clean_run(tmp_path):
    sample = {"num_samples": 24, "num_steps": 100}
    cfg_path, _, _ = write_run(tmp_path, **sample)
    out = tmp_path / "resumed"
    argv = ["sample", "--config", cfg_path, "--chunk-size", "4", "--output", str(out), "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "repa", *argv],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not list((out / "chunks").glob("chunk-*.npz")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no chunk was committed in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    survivors = stamps(out)
    assert 1 <= len(survivors) < 6, "the run must be killed after its first chunk and before its last"

    assert cli(*argv) == 0
    after = stamps(out)
    assert all(after[name] == stamp for name, stamp in survivors.items())  # not recomputed
    assert sorted(after) == [f"chunk-{c:06d}.npz" for c in range(6)]  # no duplicates, none missing

    clean = tmp_path / "clean"
    assert cli(*argv[:-2], str(clean), "--no-progress") == 0
    assert chunk_digests(str(out)) == chunk_digests(str(clean))


def test_samples_npz_is_the_adm_layout_of_all_chunks(tmp_path):
    cfg_path, _, _ = write_run(tmp_path, save_npz=True)
    out = tmp_path / "out"
    assert (
        cli("sample", "--config", cfg_path, "--chunk-size", "5", "--output", str(out), "--no-progress") == 0
    )
    sample_set = S.SampleSet.open(str(out))
    with np.load(out / "samples.npz") as npz:
        arr, labels = npz["arr_0"], npz["labels"]
    assert arr.shape == (12, 16, 16, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, np.concatenate(list(sample_set.iter_images())))
    assert np.array_equal(labels, sample_set.labels())
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_rerun_with_other_settings_into_the_same_folder_is_refused(tmp_path, capsys):
    cfg_path, _, _ = write_run(tmp_path)
    out = str(tmp_path / "out")
    assert cli("sample", "--config", cfg_path, "--chunk-size", "4", "--output", out, "--no-progress") == 0
    code = cli("sample", "--config", cfg_path, "--set", "sample.seed=7", "--chunk-size", "4", "--output", out)
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds samples made with other settings" in err and "seed: 0 there, 7 now" in err


def test_without_config_the_runs_own_config_is_used(tmp_path):
    _, run_url, _ = write_run(tmp_path)
    step = f"{run_url}/checkpoints/step-0000100"
    assert cli("sample", "--checkpoint", step, "--set", "sample.num_samples=3", "--no-progress") == 0
    (folder,) = Path(run_url, "samples").iterdir()
    assert folder.name.startswith("step-0000100-")
    assert S.SampleSet.open(str(folder)).missing_chunks() == []


# ----------------------------------------------------------------------------------------------
# Checkpoints and bad input
# ----------------------------------------------------------------------------------------------


def test_checkpoint_of_another_model_config_is_a_clear_error(tmp_path, capsys):
    _, run_url, _ = write_run(tmp_path)
    other = tiny_config(run_url)
    other["model"].update(hidden_size=64, num_classes=20)
    other_path = tmp_path / "other.yaml"
    other_path.write_text(yaml.safe_dump(other))
    assert cli("sample", "--config", str(other_path), "--output", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "model.hidden_size: checkpoint 32, config 64" in err
    assert "model.num_classes: checkpoint 10, config 20" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_uncommitted_checkpoint_is_refused(tmp_path):
    _, run_url, _ = write_run(tmp_path)
    partial = Path(run_url, "checkpoints", "step-0000200")
    partial.mkdir()
    (partial / "ema.pt").write_bytes(b"half written")
    with pytest.raises(ckpt.CheckpointError, match=r"step-0000200: has no COMMITTED marker"):
        ckpt.resolve_checkpoint(str(partial), None)
    assert ckpt.resolve_checkpoint(None, run_url).step == 100  # latest *committed*


def test_reference_checkpoint_files_load_with_config_or_recorded_args(tmp_path):
    _, run_url, cfg = write_run(tmp_path)
    sd = torch.load(Path(run_url, "checkpoints", "step-0000100", "ema.pt"), weights_only=False)["ema"]
    bare = tmp_path / "last.pt"  # the authors' released file is a bare EMA state dict: args from the config
    torch.save(sd, bare)
    loaded = ckpt.load_model(cfg, ckpt.resolve_checkpoint(str(bare), None))
    assert loaded.model_args["hidden_size"] == 32 and loaded.source.kind == "file"
    bigger = RunConfig.from_dict(
        {**tiny_config(run_url), "model": {**tiny_config(run_url)["model"], "hidden_size": 64}}
    )
    with pytest.raises(
        ckpt.ModelMismatchError, match=r"do not fit .*model.hidden_size: weights 32, config 64"
    ):
        ckpt.load_model(bigger, ckpt.resolve_checkpoint(str(bare), None))

    # Official train.py layout {model, ema, opt, args, steps}: args is its argparse Namespace.
    official_args = argparse.Namespace(
        model="SiT-XL/2",
        resolution=256,
        encoder_depth=8,
        projector_embed_dims="768",
        num_classes=1000,
        qk_norm=False,
        fused_attn=True,
        batch_size=256,
        learning_rate=1e-4,
    )
    assert model_args_from_recorded(vars(official_args)) == {
        "model": "SiT-XL/2",
        "input_size": 32,
        "in_channels": 4,
        "encoder_depth": 8,
        "z_dims": [768],
        "num_classes": 1000,
        "qk_norm": False,
        "fused_attn": True,
        "depth": 28,
        "hidden_size": 1152,
        "num_heads": 16,
        "patch_size": 2,
    }
    path = tmp_path / "official.pt"
    torch.save({"model": sd, "ema": sd, "args": official_args, "steps": 5}, path)
    with pytest.raises(
        ckpt.ModelMismatchError,
        match=r"model.name: checkpoint 'SiT-XL/2', config 'SiT-S/2'.*"
        r"model.depth: checkpoint 28, config 2",
    ):
        ckpt.load_model(cfg, ckpt.resolve_checkpoint(str(path), None))
