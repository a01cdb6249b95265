"""The image's build-time check: does the installed environment train and evaluate, not just `repa --help`?

Run by docker/Dockerfile at build time, in the package layer (a failing check fails the build; `make image`
on CI), and by `make image-env` in a fresh venv built the same way where no container engine is
(docker/install-env.sh: `lock` = requirements/lock.txt, then `package` = the repa wheel with --no-deps).
Offline, CPU only, random weights, about 30 s:

1. the installed versions: torch and torchvision as pinned (``--torch``, ``--torchvision``: the
   Dockerfile's ARGs) and, with ``--cuda``, torch's CUDA build;
2. imports: every verb's module (prepare, train, sample, eval, watch, demo), torch-fidelity's Inception
   wrapper, the fsspec back ends (s3fs, gcsfs) and the TensorBoard writer;
3. the VAE: a tiny SD-VAE (diffusers ``AutoencoderKL``) encodes and decodes one image;
4. the encoders: every registry name maps to a timm model this timm knows, and DINOv2-B (the default
   target) is built with random weights and run on one image;
5. a 2-step CPU ``repa train`` of a tiny config on shards that ``repa prepare`` writes from synthetic
   images, with a committed checkpoint at step 2.

Prints one line per stage and ``image check passed``; any failure exits non-zero with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

VERBS = (
    "repa.cli",
    "repa.data.prepare",
    "repa.train.trainer",
    "repa.eval.sample",
    "repa.eval.evaluate",
    "repa.eval.watch",
    "repa.eval.features",
    "repa.demo",
    "torch_fidelity",
    "s3fs",
    "gcsfs",
    "torch.utils.tensorboard",
)
# A toy-width SD-VAE layout (8x downsampling, 4 latent channels). The same as tests/support/tiny_runs.py's,
# written again because the image carries no tests/.
TINY_SD_VAE = dict(
    block_out_channels=[4, 4, 4, 4],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=2,
    sample_size=32,
)
TRAIN_SETS = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.encoder_depth=1",
    "model.projector_dim=32",
    "model.num_classes=10",
    "encoder.model_kwargs=[{img_size: 16, patch_size: 2, embed_dim: 32, depth: 1, num_heads: 2}]",
    "data.resolution=16",
    "data.chunk_size=2",
    "data.shards_in_flight=2",
    "train.global_batch_size=4",
    "train.max_steps=2",
    "log.every_steps=1",
    "log.sample_every_steps=2",
    "log.sample_num_images=1",
    "log.sample_num_steps=1",
    "checkpoint.every_steps=2",
]


def stage(name: str, started: float) -> None:
    print(f"image check: {name} ok ({time.perf_counter() - started:.1f} s)", flush=True)


def check_versions(torch_version: str | None, torchvision_version: str | None, cuda: str | None) -> None:
    import torch
    import torchvision

    found = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    for name, want in (("torch", torch_version), ("torchvision", torchvision_version)):
        if want and found[name].split("+")[0] != want:
            raise SystemExit(f"image check: {name} {found[name]} installed, the image pins {want}")
    if cuda and torch.version.cuda != cuda:
        raise SystemExit(f"image check: torch is built for CUDA {torch.version.cuda}, the image pins {cuda}")
    import repa

    print(
        f"image check: torch {torch.__version__} (CUDA build {torch.version.cuda}), torchvision "
        f"{torchvision.__version__}, repa from {Path(repa.__file__).parent}",
        flush=True,
    )


def check_vae() -> None:
    import torch

    from repa.vae import build_vae

    vae = build_vae("sd-vae-ft-mse", config_overrides=TINY_SD_VAE).eval()
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        moments = vae.encode_moments(images)
        decoded = vae.decode_to_uint8(moments[:, :4], 0.18215, 0.0)
    assert tuple(moments.shape) == (1, 8, 4, 4) and tuple(decoded.shape) == (1, 3, 32, 32)


def check_encoders() -> None:
    import timm
    import torch

    from repa.encoders import ENCODERS, build_encoder

    for name, spec in ENCODERS.items():
        arch = spec.timm_name.split(".")[0]
        if not timm.list_models(arch):
            raise SystemExit(f"image check: encoder {name}: timm {timm.__version__} has no model {arch}")
    encoder = build_encoder("dinov2-vit-b", resolution=256)
    with torch.no_grad():
        feats = encoder(torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8))
    assert tuple(feats.shape) == (1, 256, 768), feats.shape


def check_train(work: Path) -> None:
    import numpy as np

    from repa import checkpoint as ckpt
    from repa import synthetic
    from repa.cli import main
    from repa.data.prepare import prepare_images, prepare_latents

    rng = np.random.default_rng(0)
    labels = np.arange(20) % 10
    images = np.stack([synthetic.draw_shape(int(c), 16, rng)[0] for c in labels])
    synthetic.write_image_tree(work / "images", images, labels)
    data_url, run_url = f"file://{work}/shards", f"file://{work}/run"
    prepare_images(str(work / "images"), data_url, resolution=16, samples_per_shard=8)
    prepare_latents(data_url, vae="none", batch_size=8)
    sets = [*TRAIN_SETS, f"data.url={data_url}", f"storage.run_url={run_url}"]
    code = main(["train", "--config", "toy-cpu", *[a for s in sets for a in ("--set", s)]])
    if code != 0:
        raise SystemExit(f"image check: repa train exited {code}")
    ref = ckpt.latest_checkpoint(run_url)
    if ref is None or ref.step != 2:
        raise SystemExit(f"image check: no committed checkpoint at step 2 in {run_url} (found {ref})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", help="the torch version the image pins (e.g. 2.14.1)")
    parser.add_argument("--torchvision", help="the torchvision version the image pins")
    parser.add_argument("--cuda", help="the CUDA version torch must be built for (e.g. 13.0)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    check_versions(args.torch, args.torchvision, args.cuda)
    for name in VERBS:
        importlib.import_module(name)
    stage(f"imports ({len(VERBS)} modules)", started)
    check_vae()
    stage("VAE", started)
    check_encoders()
    stage("encoders", started)
    with tempfile.TemporaryDirectory(prefix="repa-image-check-") as work:
        check_train(Path(work))
    stage("2-step train", started)
    print("image check passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
