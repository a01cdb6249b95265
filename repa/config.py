"""The run config: one typed dataclass tree, from YAML and ``--set`` overrides to every component.

Flow: ``YAML (preset or file) -> --set a.b=c -> RunConfig (validated) -> Trainer /
sampler / watcher``. The resolved tree is saved beside the run (``{run_url}/config.yaml``), in every
checkpoint and in TensorBoard, so a run can always be re-created from its own output.

- Sections: ``model encoder vae objective data train checkpoint health log sample eval storage``.
- Defaults are the paper's SiT-XL/2 + REPA values (REPA Table 7, the reference ``train.py``); a field
  whose default differs from the reference code says so in its ``reference`` metadata (shown in the docs).
- The docstring under each field is its documentation: :func:`markdown_docs` renders
  ``docs/configuration.md`` from it and :func:`json_schema` the ``config:`` part of the Helm chart's
  ``values.schema.json`` (``repa config docs`` / ``repa config schema``; tests fail on drift).
- YAML values and ``--set`` values are coerced by each field's declared type. Int fields accept
  integral floats and numeric strings (Helm renders 4000000 as ``4e+06``, which PyYAML reads as a
  string; it also reads ``1e-4`` as a string, so float fields accept numeric strings too).
- Every error is a :class:`ConfigError` naming the dotted key (``train.lr``), the value and the fix.
- Credentials never go in a config: ``storage_options`` holds endpoints and flags only; keys and tokens
  come from the environment (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``) or a mounted Secret.

Validation reads the model size table and the encoder registry, both plain data: loading and
validating a config never imports torch (``repa config show`` answers in well under a second).
The JSON schema, the generated docs and the ``repa config`` verb live in ``repa.config_export``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "PRESETS_DIR",
    "REQUIRED_FOR",
    "SECTIONS",
    "SIZE_KWARGS",
    "VAE_DOWNSAMPLE",
    "VAE_LATENT_CHANNELS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EncoderConfig",
    "EvalConfig",
    "HealthConfig",
    "LogConfig",
    "MissingWeightsError",
    "ModelConfig",
    "ObjectiveConfig",
    "RunConfig",
    "SampleConfig",
    "StorageConfig",
    "TrainConfig",
    "VAEConfig",
    "add_config_arguments",
    "apply_overrides",
    "config_from_args",
    "list_presets",
    "load_config",
    "resolve_preset",
]

PRESETS_DIR = Path(__file__).parent / "configs"

VAEName = Literal["sd-vae-ft-mse", "sd-vae-ft-ema", "none"]
PathType = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "lognormal"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
SamplerName = Literal["sde", "ode_euler", "ode_heun"]
Weights = Literal["ema", "model"]
Metric = Literal["fid", "is", "precision_recall", "fd_dinov2"]

# Spatial downsampling and latent channels of each VAE (SD-VAE: 256 px -> 4x32x32 latents); "none" feeds
# pixels to SiT. repa.vae checks a loaded VAE against these.
VAE_DOWNSAMPLE = {"sd-vae-ft-mse": 8, "sd-vae-ft-ema": 8, "none": 1}
VAE_LATENT_CHANNELS = {"sd-vae-ft-mse": 4, "sd-vae-ft-ema": 4, "none": 3}

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
# Upper bound of every step count: 10^9 optimiser steps is ~250x the paper's longest run (4M); a larger
# value (``1e30`` from a typo) is a mistake, and Python ints would carry it silently into range() and logs.
MAX_STEPS = 1_000_000_000


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, out of range or inconsistent with another one.

    ``ConfigError("train.lr", "must be > 0")`` or ``ConfigError("train.lr: must be > 0")``; ``key`` is the
    dotted key (``train.lr``, ``encoder.names[0]``), or "" when not given. The message is folded onto
    one line, so the CLI prints it without a traceback.
    """

    def __init__(self, key: str, message: str | None = None) -> None:
        if message is None:
            key, message = "", key
        self.key = key
        text = f"{key}: {message}" if key else message
        super().__init__(" ".join(text.split()))


class MissingWeightsError(ConfigError):
    """A run of published networks lacks weights URLs: one line per missing key (not folded)."""

    def __init__(self, key: str, lines: Sequence[str]) -> None:
        super().__init__(key, "missing weights")
        self.lines = list(lines)
        self.args = ("\n".join(self.lines),)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def setting(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    reference: str | None = None,
) -> Any:
    """A numeric dataclass field with its range (checked at run time and exported to the JSON schema).

    ``reference``: what REPA's code or paper uses when it differs from our default (shown in the docs;
    non-numeric fields put it in ``field(metadata={"reference": ...})``).
    """
    bounds = (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
    meta: dict[str, Any] = {k: v for k, v in bounds if v is not None}
    if reference is not None:
        meta["reference"] = reference
    return field(default=default, metadata=meta)


#################################################################################
#                                   Sections                                    #
#################################################################################


class _Section:
    """Shared behaviour: coerce every field to its declared type, then check ranges and rules."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f"{self.SECTION}.{f.name}"
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            _check_range(value, f.metadata, key)
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between fields of this section (overridden where there are any)."""


@dataclass(kw_only=True)
class ModelConfig(_Section):
    """The SiT denoiser and its REPA projector (``repa.models.build_model``)."""

    SECTION: ClassVar[str] = "model"

    name: str = "SiT-XL/2"
    """Architecture, a key of ``repa.models.SiT_models``: ``SiT-{S,B,L,XL}/{2,4,8}`` (size / patch)."""
    encoder_depth: int = setting(8, ge=0)
    """Block (1-based) whose output tokens are projected and aligned with the encoder features.
    The paper uses 8 for SiT-L/2 and SiT-XL/2 and 4 for SiT-B/2 (REPA Table 7); must be <= depth.
    Unused (no projector) when ``encoder.names`` is empty."""
    projector_dim: int = setting(2048, ge=1)
    """Hidden width of the projector MLP ``hidden -> projector_dim -> projector_dim -> z_dim`` (SiLU)."""
    class_dropout_prob: float = setting(0.1, ge=0.0, lt=1.0)
    """Probability of replacing a label by the null class during training (classifier-free guidance)."""
    num_classes: int = setting(1000, ge=1)
    """Number of class labels; the null (unconditional) class id is ``num_classes``."""
    qk_norm: bool = False
    """LayerNorm on queries and keys in attention (reference ``--qk-norm``, off in the paper)."""
    fused_attn: bool = True
    """Use ``scaled_dot_product_attention`` (reference ``--fused-attn``); numerically equivalent."""
    hidden_size: int | None = setting(None, ge=1)
    """Override the table's width (tiny test models); null = the value for ``name``."""
    depth: int | None = setting(None, ge=1)
    """Override the table's number of blocks; null = the value for ``name``."""
    num_heads: int | None = setting(None, ge=1)
    """Override the table's number of attention heads (must divide the width); null = the table's."""
    patch_size: int | None = setting(None, ge=1)
    """Override the patch size; null = the ``/N`` of ``name``."""
    allow_random_weights: bool = False
    """Random weights only on purpose: true lets a run whose networks are the published ones (an encoder
    at its full size, an SD-VAE) start where a weights URL it needs is null, building those networks
    randomly initialised (ablations, tests). Recorded in the run's config.yaml, every checkpoint and the
    eval result JSON. false: `repa train`, `sample`, `eval`, `watch` and `repa config validate --for`
    refuse, naming each missing key and the `repa weights fetch` command that fills it. Toy runs (tiny
    ``encoder.model_kwargs``, ``vae.name: none``) need no weights either way."""

    def architecture(self) -> dict[str, int]:
        """Resolved ``depth``, ``hidden_size``, ``num_heads``, ``patch_size`` (table value or override).

        Reads the plain-data size table (``repa.models.sizes``), so no torch is imported. Raises
        ConfigError for an unknown ``name``.
        """
        from repa.models.sizes import SIT_SIZES

        if self.name not in SIT_SIZES:
            raise ConfigError(
                "model.name",
                f"unknown model {self.name!r}{_did_you_mean(self.name, SIT_SIZES)}; "
                f"allowed: {', '.join(SIT_SIZES)}",
            )
        table = SIT_SIZES[self.name]
        return {
            key: override if (override := getattr(self, key)) is not None else int(table[key])
            for key in ("depth", "hidden_size", "num_heads", "patch_size")
        }


@dataclass(kw_only=True)
class EncoderConfig(_Section):
    """Frozen representation encoders whose patch tokens are the alignment targets (``repa.encoders``)."""

    SECTION: ClassVar[str] = "encoder"

    names: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    """Encoders to align with, one projector each (reference ``--enc-type``): a registered name
    (``dinov2-vit-{s,b,l,g}``, ``-reg`` variants) or ``timm:<timm model name>``. An empty list trains a
    vanilla SiT (no alignment, no projector)."""
    weights_urls: list[str | None] = field(default_factory=list)
    """Weights file (local path or fsspec URL, timm or original layout) per encoder, same length as
    ``names``; `repa weights fetch` stages them. Empty or null entries: an encoder at its published size
    makes train refuse to start unless ``model.allow_random_weights`` (alignment with random features does
    not help); a toy-sized one (``model_kwargs``) is built randomly initialised with a warning. repa never
    downloads weights itself."""
    model_kwargs: list[dict[str, Any]] = field(default_factory=list)
    """``timm.create_model`` overrides per encoder (same length as ``names`` or empty), e.g. the size of
    a small ``timm:`` encoder: ``{embed_dim: 64, depth: 2, num_heads: 2, patch_size: 2, img_size: 32}``."""

    def check(self) -> None:
        n = len(self.names)
        for i, name in enumerate(self.names):
            if not name.strip():
                raise ConfigError(f"encoder.names[{i}]", "empty encoder name")
        if len(set(self.names)) != n:
            raise ConfigError("encoder.names", f"duplicate entries in {self.names}")
        for key in ("weights_urls", "model_kwargs"):
            m = len(getattr(self, key))
            if m not in (0, n):
                raise ConfigError(
                    f"encoder.{key}",
                    f"has {m} entries but encoder.names has {n}; give one per encoder (null for none) or []",
                )

    def weights_url(self, i: int) -> str | None:
        """Weights URL of encoder ``i`` (None = random weights)."""
        return self.weights_urls[i] if self.weights_urls else None

    def kwargs(self, i: int) -> dict[str, Any]:
        """``timm.create_model`` overrides of encoder ``i``."""
        return dict(self.model_kwargs[i]) if self.model_kwargs else {}


@dataclass(kw_only=True)
class VAEConfig(_Section):
    """The latent autoencoder: pixels -> stored moments -> latents ``(mean + std*eps)*scale + bias``."""

    SECTION: ClassVar[str] = "vae"

    name: VAEName = "sd-vae-ft-mse"
    """``sd-vae-ft-mse`` (REPA's training latents), ``sd-vae-ft-ema``, or ``none`` (SiT on pixels,
    for tiny CPU runs)."""
    weights_url: str | None = None
    """Weights of the VAE: a diffusers-format folder (config.json + diffusion_pytorch_model.safetensors),
    local path or fsspec URL. null: train, sample, eval and watch refuse to start unless
    ``model.allow_random_weights`` (then random weights with a warning); `repa prepare latents` refuses
    to store moments from a random SD-VAE. Unused for ``none``."""
    latents_scale: float = setting(0.18215, gt=0.0)
    """Multiplies sampled latents (SD-VAE's scaling factor, all 4 channels)."""
    latents_bias: float = 0.0
    """Added to scaled latents (0 in REPA)."""


@dataclass(kw_only=True)
class ObjectiveConfig(_Section):
    """The interpolant training loss: denoising (v-prediction) + ``proj_coeff`` x projection."""

    SECTION: ClassVar[str] = "objective"

    path_type: PathType = "linear"
    """Interpolant: ``linear`` (x_t = (1-t) x + t eps) or ``cosine`` (cos/sin of pi t / 2). t=0 is data."""
    prediction: Literal["v"] = "v"
    """Network target; only velocity prediction exists (as in the reference)."""
    time_sampling: TimeSampling = "uniform"
    """Distribution of t: ``uniform`` U[0, 1) or ``lognormal`` (sigma = exp(N(0, 1))). The reference calls
    this ``--weighting``, but it changes sampling, never loss weights."""
    proj_coeff: float = setting(0.5, ge=0.0)
    """lambda, the weight of the projection (negative cosine similarity) loss; paper Table 5: 0.5."""
    align_until_step: int | None = setting(None, ge=0, le=MAX_STEPS)
    """Number of optimiser updates that use the alignment loss; later ones train on the denoising loss
    alone (null = align for the whole run, as the paper; 0 = never). Steps skipped by the health guard
    are not updates and do not count."""


@dataclass(kw_only=True)
class DataConfig(_Section):
    """Prepared training shards (``repa prepare`` writes them, the streaming reader reads them)."""

    SECTION: ClassVar[str] = "data"

    url: str | None = None
    """fsspec URL of the prepared dataset (``s3://bucket/imagenet-256``, ``file:///data/x``); required
    by ``repa prepare`` and ``repa train``."""
    resolution: int = setting(256, ge=8)
    """Image side in pixels (ADM center crop); latents are ``resolution / 8`` per side with an SD-VAE."""
    num_workers: int = setting(4, ge=0)
    """DataLoader worker processes per training process (0 = read in the main process)."""
    prefetch_factor: int = setting(2, ge=1)
    """Batches each worker reads ahead (ignored when num_workers = 0)."""
    seed: int = setting(0, ge=0)
    """Seed of the data order; the order is a function of (seed, epoch), so resume is exact."""
    shards_in_flight: int = setting(64, ge=1)
    """Shards interleaved at once (the reader's lanes); part of the data order, so keep it fixed for a
    run. Each shard is read by one worker when (micro-batch / chunk_size) x processes x num_workers
    divides it (docs/data.md, "Streaming reader")."""
    chunk_size: int = setting(8, ge=1)
    """Consecutive samples taken from one shard; part of the data order. Must divide the micro-batch
    (``train.batch_size_per_device``) for the one-reader-per-shard property."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``url`` (e.g. ``{client_kwargs: {endpoint_url: http://minio:9000}}``).
    Never put credentials here: they come from the environment or a mounted Secret."""

    def location(self) -> Any:
        """``url`` bound to ``storage_options`` (a ``repa.storage.Location``); ``cfg.storage.locate(url)``
        gives the same for any URL at or below it."""
        from repa.storage import Location

        return Location(self.url or "", dict(self.storage_options))


@dataclass(kw_only=True)
class TrainConfig(_Section):
    """Optimisation, precision and the training loop (the reference ``train.py`` defaults)."""

    SECTION: ClassVar[str] = "train"

    global_batch_size: int = setting(256, ge=1)
    """Images per optimiser step over all processes (reference ``--batch-size``)."""
    batch_size_per_device: int | None = setting(None, ge=1)
    """Images per forward pass on one device; null = global_batch_size / world_size. A smaller value
    accumulates gradients over several passes; it must divide global_batch_size / world_size."""
    max_steps: int = setting(400_000, ge=1, le=MAX_STEPS)
    """Optimiser steps of the whole run (the paper's 400K iterations; its best model ran 4M)."""
    lr: float = setting(1e-4, gt=0.0)
    """AdamW learning rate, constant: no warm-up, no decay."""
    adam_beta1: float = setting(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    adam_beta2: float = setting(0.999, ge=0.0, lt=1.0)
    """AdamW beta2."""
    adam_eps: float = setting(1e-8, gt=0.0)
    """AdamW epsilon."""
    weight_decay: float = setting(0.0, ge=0.0)
    """AdamW (decoupled) weight decay."""
    max_grad_norm: float = setting(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 = no clipping)."""
    ema_decay: float = setting(0.9999, ge=0.0, lt=1.0)
    """Decay of the EMA weights, updated after every optimiser step from a copy at step 0."""
    precision: Precision = field(default="auto", metadata={"reference": "fp16 (accelerate AMP + GradScaler)"})
    """Autocast dtype: ``auto`` = bf16 on GPU and fp32 on CPU; ``fp16`` adds a GradScaler. The loss's
    feature normalisation always runs in fp32 (fp16 NaNs, REPA issue #46)."""
    allow_tf32: bool = True
    """Allow TF32 matmuls and convolutions on Ampere+ GPUs (reference ``--allow-tf32``)."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    seed: int = setting(0, ge=0)
    """Seed of model init and of per-step randomness (t, noise, label drop), mixed with rank and step."""
    device: str = "auto"
    """``auto`` (the local GPU under torchrun, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    process_group_timeout_seconds: int = setting(300, ge=1)
    """Collective timeout, so a lost worker fails the job in minutes rather than NCCL's default hour."""

    def check(self) -> None:
        if not _DEVICE.match(self.device):
            raise ConfigError("train.device", f"{self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("train.precision", "fp16 autocast is not supported on CPU; use fp32 or bf16")
        bs = self.batch_size_per_device
        if bs is not None and (bs > self.global_batch_size or self.global_batch_size % bs):
            raise ConfigError(
                "train.batch_size_per_device",
                f"{bs} does not divide train.global_batch_size={self.global_batch_size}",
            )

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """``(batch_size_per_device, accumulation_steps)`` for ``world_size`` processes.

        ``global_batch_size = world_size * batch_size_per_device * accumulation_steps`` exactly.
        """
        if world_size < 1:
            raise ConfigError("train.global_batch_size", f"world_size must be >= 1, got {world_size}")
        if self.global_batch_size % world_size:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.global_batch_size} is not divisible by the world size {world_size}; "
                "change the batch or the number of processes",
            )
        per_rank = self.global_batch_size // world_size
        bs = per_rank if self.batch_size_per_device is None else self.batch_size_per_device
        if per_rank % bs:
            raise ConfigError(
                "train.batch_size_per_device",
                f"{bs} does not divide global_batch_size / world_size = "
                f"{self.global_batch_size} / {world_size} = {per_rank}",
            )
        return bs, per_rank // bs


@dataclass(kw_only=True)
class CheckpointConfig(_Section):
    """Resumable checkpoints at ``{run_url}/checkpoints/step-0000000/`` (committed atomically)."""

    SECTION: ClassVar[str] = "checkpoint"

    every_steps: int = setting(5000, ge=1, le=MAX_STEPS, reference="50,000 (--checkpointing-steps)")
    """Save a resumable checkpoint every N optimiser steps (also at the end and on SIGTERM)."""
    keep_latest: int = setting(3, ge=1)
    """Keep the N most recent checkpoints; older ones are deleted unless kept by keep_every_steps."""
    keep_every_steps: int = setting(50_000, ge=0, le=MAX_STEPS)
    """Also keep every checkpoint whose step is a multiple of N, forever (0 = none); a multiple of
    every_steps."""
    export_ema: bool = True
    """Also write ``ema.pt`` in each checkpoint folder: the EMA weights alone, in REPA's checkpoint
    layout, so sampling and evaluation need not read the optimizer state."""
    background_upload: bool = True
    """Serialize and upload periodic checkpoints in a background thread from a CPU snapshot while
    training continues (the next save, the end and SIGTERM wait for it); false = every save blocks."""

    def check(self) -> None:
        if self.keep_every_steps % self.every_steps:
            raise ConfigError(
                "checkpoint.keep_every_steps",
                f"{self.keep_every_steps} is not a multiple of checkpoint.every_steps={self.every_steps}",
            )


@dataclass(kw_only=True)
class HealthConfig(_Section):
    """The training health guard (``repa.train.health``): skip non-finite or spiking steps, roll back
    after repeated ones, stop when rolling back does not help (docs/training-health.md)."""

    SECTION: ClassVar[str] = "health"

    enabled: bool = True
    """Check every step before the optimiser update: loss and gradient norm finite, and no spike. A bad
    step is skipped (no AdamW and no EMA update; the data position moves on). Off: every step is applied,
    as in the reference ``train.py``."""
    window_steps: int = setting(100, ge=2)
    """W: the spike statistic is the median and MAD of the loss and of the gradient norm over the last W
    applied steps; spike checks start once W steps have been applied (finite checks from step 0)."""
    spike_k: float = setting(12.0, ge=0.0)
    """k: a step spikes when its loss or gradient norm exceeds median + k x 1.4826 x MAD of the window
    (k robust standard deviations; the MAD is floored at 1 % of the median). 0 = no spike checks."""
    max_bad_steps: int = setting(3, ge=1)
    """M: after M bad steps within ``bad_step_window`` optimiser steps, roll back to the newest committed
    checkpoint written before the first of them and skip the data from the first to the last bad batch."""
    bad_step_window: int = setting(100, ge=1)
    """Optimiser steps over which bad steps are counted towards ``max_bad_steps``."""
    max_rollbacks: int = setting(3, ge=0)
    """R: rollbacks allowed within ``rollback_horizon_steps``; a further one stops the run with exit code 3
    (it needs a human: a lower ``train.lr``, another ``train.precision``, or a look at the data)."""
    rollback_horizon_steps: int = setting(10_000, ge=1)
    """Optimiser steps over which rollbacks are counted towards ``max_rollbacks``."""
    skip_sample_ranges: list[list[int]] = field(default_factory=list)
    """Stream positions ``[start, end)`` (global sample counts, as ``samples_consumed``) never trained on:
    the reader jumps over them. For data known to be bad; the guard adds the windows it skips to the
    checkpoint itself."""
    inject_sample_ranges: list[list[int]] = field(default_factory=list)
    """For tests (fault injection): stream positions ``[start, end)`` whose samples are corrupted as
    ``inject_fault`` says before the forward pass, on the rank that reads them. Leave empty."""
    inject_fault: Literal["nan", "spike"] = "nan"
    """For tests: ``nan`` sets the injected samples' moments to NaN, ``spike`` multiplies them by 1000."""

    def check(self) -> None:
        for key in ("skip_sample_ranges", "inject_sample_ranges"):
            for i, pair in enumerate(getattr(self, key)):
                if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
                    raise ConfigError(
                        f"health.{key}[{i}]", f"{pair}: expected [start, end) with 0 <= start < end"
                    )


@dataclass(kw_only=True)
class LogConfig(_Section):
    """TensorBoard scalars at ``{run_url}/tensorboard`` and in-training sample grids."""

    SECTION: ClassVar[str] = "log"

    every_steps: int = setting(100, ge=1, le=MAX_STEPS)
    """Log losses, gradient norm, throughput and MFU every N steps (averaged over the interval)."""
    tensorboard: bool = True
    """Write TensorBoard event files (rank 0 only)."""
    tensorboard_flush_every_steps: int = setting(1000, ge=1, le=MAX_STEPS)
    """Flush TensorBoard events every N steps; for object-store run URLs this re-uploads the event
    folder (no append on S3/GCS), so keep it sparse."""
    sample_every_steps: int = setting(10_000, ge=0, le=MAX_STEPS)
    """Log a grid of generated images every N steps (0 = never)."""
    sample_num_images: int = setting(16, ge=1, reference="64")
    """Images in the grid (fixed noise and labels, so grids are comparable over the run)."""
    sample_sampler: SamplerName = "ode_euler"
    """Sampler for the grid (the reference uses the Euler ODE here)."""
    sample_num_steps: int = setting(50, ge=1)
    """Sampler steps for the grid."""
    sample_cfg_scale: float = setting(4.0, ge=1.0)
    """Guidance scale for the grid (the reference's 4.0 makes early samples recognisable)."""
    sample_weights: Weights = field(
        default="ema", metadata={"reference": "model (raw training weights, logged as EMA)"}
    )
    """Which weights draw the grid: ``ema`` or the raw ``model``."""


@dataclass(kw_only=True)
class SampleConfig(_Section):
    """``repa sample``: images for FID. Noise and label of sample i are a function of (seed, i)."""

    SECTION: ClassVar[str] = "sample"

    sampler: SamplerName = "sde"
    """``sde`` (Euler-Maruyama, the paper's), ``ode_euler`` or ``ode_heun``."""
    num_steps: int = setting(250, ge=1)
    """Sampler steps (SDE 250 = 250 function evaluations, doubled inside the guidance interval)."""
    cfg_scale: float = setting(1.8, ge=1.0)
    """Classifier-free guidance scale w (1.0 = no guidance); 1.8 with guidance_high 0.7 gives FID 1.42."""
    guidance_low: float = setting(0.0, ge=0.0, le=1.0)
    """Guidance applies only for guidance_low <= t <= guidance_high (t=1 is noise)."""
    guidance_high: float = setting(0.7, ge=0.0, le=1.0)
    """Upper end of the guidance interval (Kynkaanniemi et al. 2024); 1.0 = guide everywhere."""
    num_samples: int = setting(50_000, ge=1)
    """Images to generate (FID-50K)."""
    seed: int = setting(0, ge=0)
    """Global sampling seed."""
    batch_size_per_device: int = setting(64, ge=1)
    """Images per forward pass on one device (reference ``--per-proc-batch-size``)."""
    class_balanced: bool = False
    """Labels ``i mod num_classes`` (50 per class for 50K) instead of uniform random labels (reference)."""
    checkpoint_url: str | None = None
    """Checkpoint to sample from: a step folder, a ``state.pt``/``ema.pt`` file or an official REPA
    ``.pt``; null = the latest committed checkpoint under storage.run_url."""
    checkpoint_weights: Weights = "ema"
    """Weights to sample with: ``ema`` (what the paper evaluates) or the raw ``model``."""
    vae_name: VAEName | None = None
    """VAE that decodes samples; null = the paper's decoder for vae.name's latent space: sd-vae-ft-ema
    for SD-VAE latents (REPA ``generate.py --vae ema``, while training latents come from sd-vae-ft-mse),
    the identity for ``none``. ``sd-vae-ft-mse`` decodes with the training VAE instead."""
    vae_weights_url: str | None = None
    """Weights of the decoding VAE (a diffusers folder; ``repa weights fetch`` stages sd-vae-ft-ema);
    null = vae.weights_url when the decoder is vae.name. Sampling refuses to decode with a randomly
    initialised sd-vae-ft-ema while vae.weights_url holds real weights."""
    output_url: str | None = None
    """Where samples go; null = ``{run_url}/samples/step-NNNNNNN-<settings>``."""
    save_npz: bool = False
    """Also write ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3)) for the ADM evaluation suite."""
    chunk_size: int = setting(1000, ge=1)
    """Samples per chunk file: the unit of resumption and of work per rank (``--chunk-size``)."""
    precision: Precision | None = field(default="fp32", metadata={"reference": "fp32 + TF32 (generate.py)"})
    """Autocast dtype of the model while sampling (``--precision``): fp32 is the paper's protocol
    (``generate.py`` samples in fp32 with TF32 matmuls, see train.allow_tf32); ``auto``/``bf16`` are
    about twice as fast on GPUs but are not the protocol FIDs are compared under. null (configs
    written before this default) = fp32."""

    def check(self) -> None:
        if self.guidance_low > self.guidance_high:
            raise ConfigError(
                "sample.guidance_low",
                f"{self.guidance_low} > sample.guidance_high={self.guidance_high}; need low <= high",
            )


@dataclass(kw_only=True)
class EvalConfig(_Section):
    """``repa eval`` / ``repa watch``: FID, IS and precision/recall of samples vs reference statistics."""

    SECTION: ClassVar[str] = "eval"

    reference_stats_url: str | None = None
    """Reference statistics (e.g. from ``VIRTUAL_imagenet256_labeled.npz``); required by ``repa eval``."""
    inception_weights_url: str | None = None
    """Inception-v3 FID weights file (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``),
    local path or fsspec URL; required by `repa eval` (nothing is downloaded: clusters are often offline)."""
    metrics: list[Metric] = field(default_factory=lambda: ["fid", "is", "precision_recall"])
    """Metrics to compute: Inception's FID (and sFID when the reference has ``mu_s``/``sigma_s``), IS,
    precision/recall; ``fd_dinov2`` adds FD-DINOv2 (dgm-eval's ViT-L/14 features) from the same read of
    the samples, which needs dinov2_weights_url and dinov2_reference_stats_url."""
    dinov2_weights_url: str | None = None
    """DINOv2 ViT-L/14 weights for FD-DINOv2 (``repa weights fetch DEST --only dinov2-vit-l``: timm's
    ``model.safetensors`` or facebookresearch's ``dinov2_vitl14_pretrain.pth``); local path or fsspec URL.
    Also what ``repa eval ref-stats --dinov2`` computes statistics with. Nothing is downloaded."""
    dinov2_reference_stats_url: str | None = None
    """Reference statistics of DINOv2 features (``repa eval ref-stats --dinov2``), the other side of
    FD-DINOv2; required when eval.metrics has fd_dinov2."""
    watch_poll_seconds: int = setting(60, ge=1)
    """``repa watch``: seconds between listings of the checkpoint folder."""
    watch_every_nth: int = setting(1, ge=1)
    """``repa watch``: evaluate every Nth committed checkpoint (by checkpoint index)."""
    watch_only_latest: bool = False
    """``repa watch``: skip a backlog and evaluate only the newest unevaluated checkpoint."""
    feature_extractor: str | None = None
    """``MODULE:CALLABLE`` returning a custom feature network (reported as ``FD_<name>``;
    ``--feature-extractor``); null = Inception-v3 from inception_weights_url (FID, IS)."""
    keep_samples: bool = True
    """Keep the samples once the result is written (false = ``--delete-samples``; a 50K set of 256 px
    images is ~10 GB)."""
    tensorboard_run: str = "eval"
    """TensorBoard run (folder under ``{run_url}/tensorboard``) of the evaluations' scalars, grids and
    HParams. The watcher's guidance sweep scores its best cells into ``<this>_best_guidance``, so one
    curve never mixes guidance settings."""
    sweep_every_nth: int = setting(0, ge=0)
    """``repa watch``: every Nth checkpoint (by checkpoint index) first gets a guidance sweep
    (``repa eval sweep``, sweep_num_samples per cell), then its best cell (lowest Fréchet distance) is
    scored at the full protocol instead of sample.cfg_scale / guidance_high; 0 = off."""
    sweep_num_samples: int = setting(1000, ge=1)
    """Samples per cell of the watcher's guidance sweep (the same labels and noises in every cell)."""
    sweep_cfg_scales: list[float] = field(default_factory=lambda: [1.0, 1.4, 1.8, 2.2])
    """CFG scales of the watcher's guidance sweep."""
    sweep_guidance_highs: list[float] = field(default_factory=lambda: [0.6, 0.7, 1.0])
    """Guidance-interval ends (guidance on t in [0, high]) of the watcher's guidance sweep."""
    sweep_pods: int = setting(2, ge=1)
    """``repa watch --launch-jobs``: pods (indices) of the sweep's Indexed Job, sharing its cells."""

    def check(self) -> None:
        if not self.metrics:
            raise ConfigError("eval.metrics", "empty; choose from fid, is, precision_recall, fd_dinov2")
        if self.dinov2_reference_stats_url and "fd_dinov2" not in self.metrics:
            raise ConfigError(
                "eval.dinov2_reference_stats_url",
                "set, but eval.metrics lacks fd_dinov2, so FD-DINOv2 would not be computed; add fd_dinov2 "
                "to eval.metrics or drop the key",
            )
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError("eval.metrics", f"duplicate entries in {self.metrics}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.tensorboard_run):
            raise ConfigError(
                "eval.tensorboard_run",
                f"{self.tensorboard_run!r}: expected a folder name (letters, digits, _ . -)",
            )
        for key in ("sweep_cfg_scales", "sweep_guidance_highs"):
            values = getattr(self, key)
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"eval.{key}", f"{values}: expected a non-empty list of distinct numbers")


@dataclass(kw_only=True)
class StorageConfig(_Section):
    """Where a run lives: ``{run_url}/config.yaml``, ``checkpoints/``, ``tensorboard/``, ``samples/``."""

    SECTION: ClassVar[str] = "storage"

    run_url: str | None = None
    """fsspec URL of the run folder (``s3://bucket/runs/name``, ``file:///runs/name``); required by
    ``repa train``. The run's location is a function of the config, so a restarted pod resumes it."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for run_url and every other location of the run except data.url (weights files,
    reference statistics, checkpoints to sample): endpoint, region... Never credentials: those come from
    the environment (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``) or a mounted Secret."""

    connect_timeout_seconds: float = setting(10.0, gt=0.0, le=3600.0)
    """Seconds to open a connection to the object store (botocore ``connect_timeout``, aiohttp
    ``sock_connect`` for GCS and HTTP) before the attempt counts as failed and is retried."""
    read_timeout_seconds: float = setting(60.0, gt=0.0, le=3600.0)
    """Seconds a connection may stay silent (no bytes from the store) before the attempt counts as
    failed and is retried (botocore ``read_timeout``, aiohttp ``sock_read``)."""
    deadline_seconds: float = setting(600.0, gt=0.0, le=86_400.0)
    """Wall-clock limit of one storage operation, every retry included: an outage shorter than this is
    survived, a longer one ends the run (exit code 4) naming the operation and URL that failed first.
    Must exceed the upload time of the largest checkpoint (docs/kubernetes.md, "Preemption")."""
    lease_stale_seconds: float = setting(600.0, gt=0.0, le=86_400.0)
    """A run's lease (``{run_url}/LEASE``, one writer per run) without a heartbeat for this long is
    stale: a new ``repa train`` takes it over with a warning (the old writer crashed)."""
    lease_renew_seconds: float = setting(60.0, gt=0.0, le=86_400.0)
    """Heartbeat period of the lease; must be well below lease_stale_seconds."""
    lease_conditional_writes: bool = True
    """Take and renew the lease with the store's conditional writes (S3 If-None-Match/If-Match, GCS
    ifGenerationMatch, link/flock on a file system), so two trainers started together cannot both win.
    A store without them refuses the run; false runs anyway with a plain write and read-back (two
    trainers started within one round trip can both train)."""

    def check(self) -> None:
        if self.lease_renew_seconds * 2 > self.lease_stale_seconds:
            raise ConfigError(
                "storage.lease_renew_seconds",
                f"{self.lease_renew_seconds:g} is more than half of storage.lease_stale_seconds="
                f"{self.lease_stale_seconds:g}: one late heartbeat would make a live run look crashed",
            )

    def locate(self, url: Any) -> Any:
        """``url`` as a ``repa.storage.Location`` with the fsspec options that reach it, or None for no
        URL: a URL at or below ``data.url`` gets ``data.storage_options``, any other (run folder, weights,
        reference statistics, checkpoints) ``storage.storage_options``. A Location is returned as is.

        The one way to turn a URL of this config into something storage reads (data and run alike).
        """
        from repa.storage import Location

        if url is None or isinstance(url, Location):
            return url
        url = str(url)
        data = getattr(self, "_data", None)  # the run's DataConfig (RunConfig links it)
        if data is not None and data.url and _below(url, data.url):
            return Location(url, dict(data.storage_options))
        return Location(url, dict(self.storage_options))

    def policy(self) -> Any:
        """The ``storage.*`` timeouts as a ``repa.storage.Policy`` (a value: installing it is the verb's
        job, ``config_from_args``; loading a config never does)."""
        from repa.storage import Policy

        return Policy(
            connect_timeout=self.connect_timeout_seconds,
            read_timeout=self.read_timeout_seconds,
            deadline=self.deadline_seconds,
        )


def _below(url: str, root: str) -> bool:
    """True if ``url`` is ``root`` or inside it (``s3://b/d`` holds ``s3://b/d/x``, not ``s3://b/dx``)."""
    root = root.rstrip("/")
    return url.rstrip("/") == root or url.startswith(root + "/")


#################################################################################
#                                   RunConfig                                   #
#################################################################################

# encoder.model_kwargs keys that change an encoder's size: with one, it is a toy, not the published network.
SIZE_KWARGS = frozenset({"embed_dim", "depth", "num_heads", "mlp_ratio"})
# Keys each verb needs besides the defaults (checked by RunConfig.require / `repa config validate --for`).
REQUIRED_FOR: dict[str, tuple[str, ...]] = {
    "prepare": ("data.url",),
    "train": ("data.url", "storage.run_url"),
    "watch": ("storage.run_url",),
    "eval": ("eval.reference_stats_url",),
    "sample": (),
}


@dataclass(kw_only=True)
class RunConfig:
    """Everything one run needs, one section per component; validated on construction.

    ``RunConfig(train={"lr": 2e-4})`` accepts mappings for sections; prefer :func:`load_config`.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _build_section(cls, value, name))
            elif not isinstance(value, cls):
                got = f"{value!r} ({type(value).__name__})"
                raise ConfigError(name, f"expected a mapping (section), got {got}")
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # cfg.storage.locate(url) picks data.storage_options for URLs below data.url: link the sections
        # (an attribute, not a field: it is not part of the config tree, its YAML or its equality).
        if name in ("data", "storage"):
            storage, data = getattr(self, "storage", None), getattr(self, "data", None)
            if isinstance(storage, StorageConfig) and isinstance(data, DataConfig):
                storage._data = data

    # ---------------------------------------------------------------- validation
    def validate(self) -> RunConfig:
        """Check every section, then the rules between sections. Returns self; raises ConfigError."""
        for name in SECTIONS:
            getattr(self, name).validate()
        self._check_model()
        self._check_encoders()
        decode = self.sample.vae_name
        if decode is not None and (decode == "none") != (self.vae.name == "none"):
            raise ConfigError(
                "sample.vae_name",
                f"{decode!r} cannot decode latents of vae.name={self.vae.name!r} (different latent spaces; "
                "sd-vae-ft-mse and sd-vae-ft-ema share one)",
            )
        if self.checkpoint.every_steps % self.log.every_steps:
            raise ConfigError(
                "checkpoint.every_steps",
                f"{self.checkpoint.every_steps} is not a multiple of log.every_steps={self.log.every_steps} "
                "(every checkpoint step should also be a logged step)",
            )
        return self

    def _check_model(self) -> None:
        arch = self.model.architecture()
        depth, hidden = arch["depth"], arch["hidden_size"]
        heads, patch = arch["num_heads"], arch["patch_size"]
        lo = 1 if self.encoder.names else 0
        if not lo <= self.model.encoder_depth <= depth:
            raise ConfigError(
                "model.encoder_depth",
                f"{self.model.encoder_depth} must be in [{lo}, {depth}] for {self.model.name} "
                f"(depth {depth}); it is the 1-based block whose output is aligned",
            )
        if hidden % heads:
            raise ConfigError(
                "model.num_heads", f"{heads} does not divide the width {hidden} of {self.model.name}"
            )
        down = VAE_DOWNSAMPLE[self.vae.name]
        if self.data.resolution % down:
            raise ConfigError(
                "data.resolution", f"{self.data.resolution} is not divisible by vae {self.vae.name}'s {down}"
            )
        latent = self.data.resolution // down
        if latent % patch:
            raise ConfigError(
                "data.resolution",
                f"{self.data.resolution} px gives {latent}x{latent} latents, not divisible by the patch "
                f"size {patch} of {self.model.name}",
            )

    def _check_encoders(self) -> None:
        if not self.encoder.names:
            return
        from repa.encoders.registry import ENCODERS, UnknownEncoderError, resolve_encoder_spec

        for i, name in enumerate(self.encoder.names):
            key = f"encoder.names[{i}]"
            try:
                spec = resolve_encoder_spec(name)
            except UnknownEncoderError:
                raise ConfigError(
                    key,
                    f"unknown encoder {name!r}{_did_you_mean(name, ENCODERS)}; known: "
                    f"{', '.join(sorted(ENCODERS))}, or 'timm:<timm model name>'",
                ) from None
            try:
                spec.preprocessing.input_size(self.data.resolution, self.encoder.kwargs(i).get("img_size"))
            except ValueError as e:
                raise ConfigError(key, f"{name!r} at data.resolution={self.data.resolution}: {e}") from None

    def sample_precision(self) -> str:
        """The autocast precision for sampling: ``sample.precision`` (null = fp32, the paper's protocol)."""
        return self.sample.precision or "fp32"

    def decoder_vae_name(self) -> str:
        """The VAE that decodes samples: ``sample.vae_name``, else sd-vae-ft-ema for SD-VAE latents."""
        return self.sample.vae_name or ("none" if self.vae.name == "none" else "sd-vae-ft-ema")

    def decoder_vae(self) -> tuple[str, str | None]:
        """``(name, weights_url)`` of the VAE that decodes samples (see ``sample.vae_name``).

        Raises ConfigError naming ``sample.vae_weights_url`` when the decoder differs from vae.name, has
        no weights, and vae.weights_url has some: decoding real latents with a random VAE is a silent
        FID bug, while random weights everywhere is a toy run (a warning is logged when it is built).
        """
        name = self.decoder_vae_name()
        if name == self.vae.name:
            return name, self.sample.vae_weights_url or self.vae.weights_url
        if self.sample.vae_weights_url is None and self.vae.weights_url is not None:
            raise ConfigError(
                "sample.vae_weights_url",
                f"samples are decoded with {name} (the paper's protocol; sample.vae_name="
                f"{self.sample.vae_name or 'null'}) but only vae.weights_url ({self.vae.weights_url}, "
                f"{self.vae.name}) has weights; set sample.vae_weights_url to a {name} folder "
                f"(`repa weights fetch` stages one) or sample.vae_name={self.vae.name} to decode with "
                "the training VAE",
            )
        return name, self.sample.vae_weights_url

    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, side, side)`` of the latents SiT works on: the VAE's channels at
        ``data.resolution / downsampling`` per side."""
        side = self.data.resolution // VAE_DOWNSAMPLE[self.vae.name]
        return VAE_LATENT_CHANNELS[self.vae.name], side, side

    def require(self, *keys: str, purpose: str = "this command") -> RunConfig:
        """Raise ConfigError unless every dotted key is set (not null / empty)."""
        for key in keys:
            section, _, name = key.partition(".")
            if getattr(getattr(self, section), name) in (None, "", [], {}):
                raise ConfigError(key, f"required by {purpose}; set it in the config or with --set {key}=...")
        return self

    def require_fd_dinov2_inputs(self) -> RunConfig:
        """With ``fd_dinov2`` in eval.metrics, both DINOv2 URLs must be set (no random or downloaded
        DINOv2: its distance would mean nothing)."""
        if "fd_dinov2" not in self.eval.metrics:
            return self
        if not self.eval.dinov2_weights_url:
            raise ConfigError(
                "eval.dinov2_weights_url",
                "required by eval.metrics fd_dinov2; `repa weights fetch DEST --only dinov2-vit-l` stages "
                "the file and prints the --set line",
            )
        if not self.eval.dinov2_reference_stats_url:
            raise ConfigError(
                "eval.dinov2_reference_stats_url",
                "required by eval.metrics fd_dinov2; compute them with `repa eval ref-stats --dinov2 "
                "--out URL` (DINOv2 features of the reference images)",
            )
        return self

    def require_for(self, verb: str, config: str | None = None) -> RunConfig:
        """Check the keys ``repa <verb>`` needs (``REQUIRED_FOR``; sampling verbs: a decoding VAE; the
        weights of published networks, :meth:`require_weights`, whose message shows ``config``)."""
        self.require(*REQUIRED_FOR.get(verb, ()), purpose=f"`repa {verb}`")
        if verb in ("eval", "watch"):
            self.require_fd_dinov2_inputs()
        if verb in ("sample", "eval", "watch"):
            self.decoder_vae()
        return self.require_weights(verb, config)

    def published_networks(self) -> list[str]:
        """Networks of this run at their published size, whose random initialisation would silently
        spoil it: every encoder without a size override in ``encoder.model_kwargs`` and an SD-VAE. A toy
        run (tiny timm encoder, ``vae.name: none``) has none; it then needs no Inception weights either."""
        out = [self.encoder.names[i] for i in self._published_encoders()]
        return out + ([self.vae.name] if self.vae.name != "none" else [])

    def _published_encoders(self) -> list[int]:
        """Indices of the encoders at their published size (no size override in encoder.model_kwargs)."""
        return [i for i in range(len(self.encoder.names)) if not SIZE_KWARGS & set(self.encoder.kwargs(i))]

    def missing_weights(self, verb: str) -> list[tuple[str, str]]:
        """``(key, repa weights fetch catalogue name)`` of every weights URL ``repa <verb>`` needs and
        this config leaves null; empty for toy runs and with ``model.allow_random_weights``."""
        if self.model.allow_random_weights or not self.published_networks():
            return []
        out = []
        if verb == "train":
            out += [
                (f"encoder.weights_urls[{i}]", self.encoder.names[i])
                for i in self._published_encoders()
                if not self.encoder.weights_url(i)
            ]
            if self.vae.name != "none" and not self.vae.weights_url:
                out.append(("vae.weights_url", self.vae.name))
        if verb in ("sample", "eval", "watch"):
            decoder = self.decoder_vae_name()
            url = self.sample.vae_weights_url or (self.vae.weights_url if decoder == self.vae.name else None)
            if decoder != "none" and not url:
                out.append(
                    ("vae.weights_url" if decoder == self.vae.name else "sample.vae_weights_url", decoder)
                )
        if (
            verb in ("eval", "watch")
            and not self.eval.feature_extractor
            and not self.eval.inception_weights_url
        ):
            out.append(("eval.inception_weights_url", "inception"))
        return out

    def require_weights(self, verb: str, config: str | None = None) -> RunConfig:
        """Raise MissingWeightsError, one line per key of :meth:`missing_weights` naming the
        ``repa weights fetch`` command that fills it (``config``: the --config to show in it)."""
        missing = self.missing_weights(verb)
        if not missing:
            return self
        names = ", ".join(self.published_networks())
        lines = [
            f"`repa {verb}` would run the published networks of this config ({names}) on RANDOM weights: "
            f"{len(missing)} weights URL(s) missing (random weights only on purpose: "
            "--set model.allow_random_weights=true)"
        ]
        shown = f" --config {config}" if config else " --config CONFIG"
        lines += [
            f"  {key} ({name}) is null: `repa weights fetch{shown} --only {name} DEST` stages it and prints "
            f"the --set {key.split('[')[0]}=... line"
            for key, name in missing
        ]
        raise MissingWeightsError(missing[0][0], lines)

    # ---------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (deep copy), the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """YAML of :meth:`to_dict`, sections and fields in declaration order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any] | None) -> RunConfig:
        """Build and validate from a nested mapping; missing keys take defaults, unknown keys are errors."""
        tree = {} if tree is None else tree
        if not isinstance(tree, Mapping):
            raise ConfigError("", f"a config must be a mapping of sections, got {type(tree).__name__}")
        _check_keys(tree)
        return cls(**{name: _build_section(SECTIONS[name], tree.get(name), name) for name in SECTIONS})

    @classmethod
    def from_yaml(cls, text: str, overrides: Sequence[str] = ()) -> RunConfig:
        """Parse YAML text, apply ``overrides``, validate."""
        return cls.from_dict(apply_overrides(resolve_preset(_parse_yaml(text, "config")), overrides))


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "encoder": EncoderConfig,
    "vae": VAEConfig,
    "objective": ObjectiveConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "health": HealthConfig,
    "log": LogConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
    "storage": StorageConfig,
}


#################################################################################
#                        Loading, overrides and coercion                         #
#################################################################################


def list_presets() -> list[str]:
    """Names of the bundled presets (``repa/configs/<name>.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config: ``source`` is a YAML file (path or fsspec URL), a preset name, or None.

    ``overrides`` are ``section.key=value`` strings (``--set``), applied in order after the file.
    """
    if source is None:
        tree: dict[str, Any] = {}
    else:
        text, origin = _read_source(source)
        tree = resolve_preset(_parse_yaml(text, origin), origin)
    return RunConfig.from_dict(apply_overrides(tree, overrides))


PRESET_KEY = "preset"


def resolve_preset(tree: Mapping[str, Any], origin: str = "config") -> dict[str, Any]:
    """A tree with a top-level ``preset: NAME`` key: that bundled preset, with the tree's other keys
    merged over it (mappings key by key, any other value replaces). The Helm chart's ConfigMap uses it
    (``config.preset`` plus overrides, resolved in the pod where repa is installed: docs/kubernetes.md)."""
    tree = dict(tree)
    if PRESET_KEY not in tree:
        return tree
    name = tree.pop(PRESET_KEY)
    presets = list_presets()
    if not isinstance(name, str) or name not in presets:
        hint = _did_you_mean(name, presets) if isinstance(name, str) else ""
        raise ConfigError(
            PRESET_KEY, f"{origin}: unknown preset {name!r}{hint}; presets: {', '.join(presets)}"
        )
    base = _parse_yaml((PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8"), f"preset {name}")

    def merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(low)
        for k, v in high.items():
            both = isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
            out[k] = merge(out[k], v) if both else copy.deepcopy(v)
        return out

    return merge(base, tree)


def _read_source(source: str | Path) -> tuple[str, str]:
    from repa import storage  # fsspec itself loads only for a remote URL

    src = str(source)
    if not storage.is_local(src):
        try:
            return storage.read_bytes(src).decode("utf-8"), src
        except storage.StorageError:  # unreachable or refused: the storage failure's own line and code
            raise
        except Exception as e:  # FileNotFoundError, a bad URL...
            raise ConfigError("", f"cannot read config {src!r}: {e}") from None
    path = Path(storage.local_path(src) or src)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise ConfigError(
                "", f"config {src!r} is not a UTF-8 text (YAML) file: {e.reason} at byte {e.start}"
            ) from None
        except OSError as e:
            raise ConfigError("", f"cannot read config {src!r}: {e.strerror or e}") from None
    preset = PRESETS_DIR / f"{src.removesuffix('.yaml')}.yaml"
    if "/" not in src and preset.is_file():
        return preset.read_text(encoding="utf-8"), f"preset {preset.stem}"
    raise ConfigError(
        "",
        f"config {src!r} is neither a file nor a preset{_did_you_mean(src, list_presets())}; "
        f"presets: {', '.join(list_presets())}",
    )


def _parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{origin}: invalid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError("", f"{origin}: expected a mapping of sections, got {type(tree).__name__}")
    return tree


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``"section.key=value"`` applied.

    The value is parsed as YAML (``[a, b]``, ``null``, ``true``, ``{k: v}``) and coerced by the field's
    declared type, so ``train.max_steps=4e+06`` is the int 4000000. Keys below a dict-typed field
    (``data.storage_options.client_kwargs.endpoint_url=...``) set entries inside it.
    """
    if isinstance(overrides, str):  # a single "a.b=c" would otherwise be iterated by character
        overrides = [overrides]
    out = copy.deepcopy(dict(tree))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("", f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=2e-4")
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(key, f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=2e-4")
        section, name, rest = parts[0], parts[1], parts[2:]
        _check_keys({section: {name: None}})
        tp = _hints(SECTIONS[section])[name]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse {raw!r} as YAML: {' '.join(str(e).split())}") from None
        sec = out.get(section)
        if sec is None:
            sec = out[section] = {}
        elif not isinstance(sec, dict):
            raise ConfigError(section, f"expected a mapping (section), got {sec!r}")
        if rest:
            if get_origin(tp) is not dict and tp is not dict:
                raise ConfigError(key, f"{section}.{name} is {_type_name(tp)}, not a mapping")
            node = sec.get(name)
            if node is None:
                node = sec[name] = {}
            for part in rest[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(key, f"{part!r} is not a mapping")
            node[rest[-1]] = value
            continue
        if _accepts_str(tp) and value is not None and not isinstance(value, str):
            value = raw.strip()  # `model.name=123` or `device=cuda:0` stay the text the user wrote
        sec[name] = _coerce(value, tp, key)
    return out


def _check_keys(tree: Mapping[str, Any]) -> None:
    """Unknown sections or fields -> ConfigError with the closest known keys."""
    for section, body in tree.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS), n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(str(section), f"unknown section; {hint}sections: {', '.join(SECTIONS)}")
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(section, f"expected a mapping (section), got {body!r} ({type(body).__name__})")
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for name in body:
            if name not in names:
                raise ConfigError(f"{section}.{name}", f"unknown key{_suggest_key(section, str(name))}")


def _suggest_key(section: str, name: str) -> str:
    """``; did you mean train.lr?``: close names in the section, then the same or a close name elsewhere."""
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    hints = [f"{section}.{n}" for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6)]
    for other, cls in SECTIONS.items():
        if other != section:
            others = [f.name for f in dataclasses.fields(cls)]
            hints += [f"{other}.{n}" for n in difflib.get_close_matches(name, others, n=2, cutoff=0.8)]
    if hints:
        return f"; did you mean {' or '.join(dict.fromkeys(hints))}?"
    return f"; keys of {section}: {', '.join(names)}"


def _build_section(cls: type[_Section], body: Mapping[str, Any] | None, name: str) -> _Section:
    body = {} if body is None else body
    _check_keys({name: body})
    return cls(**copy.deepcopy(dict(body)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return _is_union(tp) and any(_accepts_str(a) for a in get_args(tp))


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a mapping"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``, or ConfigError naming ``key``, the expected type and the value."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise _type_error(value, tp, key)
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(key, f"{value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key)
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(value, tp, key)
        if isinstance(value, int):
            return value
        number = _as_float(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)  # Helm renders 4000000 as 4e+06
        raise _type_error(value, tp, key)
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(value, tp, key)
        number = float(value) if isinstance(value, int) else _as_float(value)
        if number is None or not math.isfinite(number):
            raise _type_error(value, tp, key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key)
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(value, tp, key)
        return copy.deepcopy(dict(value))
    raise TypeError(f"{key}: unsupported config field type {tp!r}")  # a bug in this module, not user input


def _as_float(value: Any) -> float | None:
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _type_error(value: Any, tp: Any, key: str) -> ConfigError:
    return ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for op, bound, ok in (
        ("ge", ">=", lambda v, b: v >= b),
        ("gt", ">", lambda v, b: v > b),
        ("le", "<=", lambda v, b: v <= b),
        ("lt", "<", lambda v, b: v < b),
    ):
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(key, f"{value!r} is out of range; must be {bound} {meta[op]}")


def _did_you_mean(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


#################################################################################
#                          CLI: shared arguments, `repa config`              #
#################################################################################


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--config FILE|PRESET`` and repeatable ``--set section.key=value`` (every verb uses these)."""
    parser.add_argument(
        "--config",
        "-c",
        required=required,
        metavar="FILE|PRESET",
        help=f"YAML file, fsspec URL or preset ({', '.join(list_presets())}); default: built-in defaults",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value (repeatable), parsed as YAML: --set train.lr=2e-4 --set encoder.names=[]",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated RunConfig named by ``--config`` and ``--set``, for a verb that starts now.

    Where a verb starts is where its config takes effect: the config's ``storage.*`` timeouts are
    installed for this process's storage operations (``repa.storage.configure``) here, never by
    :func:`load_config` (pure: two configs loaded in one process do not race for a global).
    """
    from repa import storage

    cfg = load_config(args.config, args.overrides)
    storage.configure(cfg.storage.policy())
    return cfg
