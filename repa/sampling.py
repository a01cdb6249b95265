"""Samplers for velocity-predicting SiT models: Euler / Heun ODE and Euler–Maruyama SDE, with
classifier-free guidance (CFG) restricted to a guidance interval.

Numerics follow the official REPA ``samplers.py`` (sihyun-yu/REPA @ 67f7145), which in
turn reproduces SiT's ``transport`` defaults (willisma/SiT ``transport/integrators.py``):

- time runs from t=1 (noise) to t=0 (data), interpolant ``x_t = α_t·x_0 + σ_t·ε`` (linear: α=1−t, σ=t);
- the state is integrated in **float64**; the model sees ``x`` cast to the latent dtype (``z.dtype``,
  normally float32) and ``t`` as a (B,) tensor of that dtype, unscaled: ``v = model(x, t, y)[0]``;
- a step at time ``t_cur`` is *guided* iff ``cfg_scale > 1`` and ``guidance_low ≤ t_cur ≤ guidance_high``
  (both bounds inclusive). A guided step evaluates the conditional and unconditional halves in one
  doubled batch ``[x; x]`` with labels ``[y; null]`` and combines ``u + w·(c − u)``
  (Ho & Salimans 2022; interval: Kynkäänniemi et al. 2024). The null label is ``model.null_class``
  (= ``num_classes``), never a hard-coded 1000, so models with other class counts can be guided.

Differences from the reference, each a fix: any ``num_classes`` works with ``cfg_scale > 1`` (the reference
hard-codes ``y_null = 1000`` and crashes otherwise); arguments are validated with ValueErrors; SDE noise is
injectable (``generator=`` or ``noise=``) instead of drawn from the global RNG only.

The samplers run under ``torch.no_grad()`` and do not change the model's mode: call ``model.eval()`` first
(in train mode SiT's label embedder randomly drops labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from repa.objective import interpolant

__all__ = [
    "DEFAULT_NUM_STEPS",
    "SAMPLERS",
    "SDE_LAST_STEP_SIZE",
    "SamplerTrace",
    "euler_maruyama_sampler",
    "euler_sampler",
    "ode_time_grid",
    "sample",
    "score_from_velocity",
    "sde_time_grid",
]

# Names accepted by `sample(sampler=...)`, and the step counts of the reference's generate.py
# (`--mode sde` is the paper's 250-step setting; `--mode ode` defaults to 50 steps).
SAMPLERS: tuple[str, ...] = ("sde", "ode_euler", "ode_heun")
DEFAULT_NUM_STEPS: dict[str, int] = {"sde": 250, "ode_euler": 50, "ode_heun": 50}

# The SDE integrates stochastically down to t = 0.04, then takes one deterministic "mean" step to 0
# (SiT `--last-step Mean --last-step-size 0.04`): the score σ-division blows up near t = 0.
SDE_LAST_STEP_SIZE = 0.04

# model(x, t, y) -> (v, zs); only v is used.
Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


@dataclass
class SamplerTrace:
    """What a sampler did, filled in when passed as ``trace=``: for tests, logs and cost accounting.

    ``guided[i]`` says whether step ``i`` (at ``t_steps[i]``) used the doubled CFG batch; Heun's second
    evaluation of a step shares that step's decision. ``nfe`` counts model calls (a doubled call counts
    once, as in the golden ``*_nfe``); ``forward_equivalents`` counts B-sized forward passes (a doubled
    call counts twice), i.e. the compute cost in units of one plain forward of the batch.
    """

    t_steps: torch.Tensor | None = None
    guided: list[bool] = field(default_factory=list)
    nfe: int = 0
    forward_equivalents: int = 0

    def _record_call(self, guided: bool) -> None:
        self.nfe += 1
        self.forward_equivalents += 2 if guided else 1


# --------------------------------------------------------------------------------------------------
#                                           Time grids
# --------------------------------------------------------------------------------------------------


def ode_time_grid(num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N+1,) float64 ``linspace(1, 0, N+1)``: the ODE grid of ``euler_sampler``."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=device)


def sde_time_grid(num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N+1,) float64 ``cat(linspace(1, 0.04, N), [0])``: N−1 stochastic steps, then one last step to 0."""
    t = torch.linspace(1.0, SDE_LAST_STEP_SIZE, num_steps, dtype=torch.float64, device=device)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


# --------------------------------------------------------------------------------------------------
#                                        Shared machinery
# --------------------------------------------------------------------------------------------------


def _is_guided(t_cur: float, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    """Guidance interval test of the reference: inclusive at both ends (t = 0.7 with high = 0.7 is guided)."""
    return cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high


class _Evaluator:
    """Calls the model on the float64 state, with or without the doubled CFG batch.

    ``__call__(x, t, guided, combine)`` returns ``combine(out, x_in, t)`` for the B rows, where ``out`` is the
    float64 velocity on the (possibly doubled) batch ``x_in``; guided calls return
    ``combine_u + w·(combine_c − combine_u)``. ``combine`` is the identity for the ODE (CFG on the velocity)
    and the drift for the SDE (CFG on the drift, as the reference).
    """

    def __init__(
        self,
        model: Model,
        y: torch.Tensor,
        cfg_scale: float,
        null_class: int | None,
        model_dtype: torch.dtype,
        trace: SamplerTrace | None,
    ) -> None:
        self.model = model
        self.y = y
        self.cfg_scale = cfg_scale
        self.model_dtype = model_dtype
        self.trace = trace
        # Labels of a guided call, built once: [y; null] (B,) + (B,) -> (2B,).
        self.y_cfg = None if null_class is None else torch.cat([y, torch.full_like(y, null_class)])

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        guided: bool,
        combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        if guided:
            assert self.y_cfg is not None  # checked by _resolve_null_class
            x_in, y_in = torch.cat([x, x]), self.y_cfg  # (2B, ...), (2B,)
        else:
            x_in, y_in = x, self.y  # (B, ...), (B,)
        t_in = torch.full((x_in.shape[0],), 1.0, dtype=torch.float64, device=x.device) * t  # (B',) float64
        out = self.model(x_in.to(self.model_dtype), t_in.to(self.model_dtype), y_in)[0].to(torch.float64)
        if self.trace is not None:
            self.trace._record_call(guided)
        out = combine(out, x_in, t)
        if not guided:
            return out
        out_cond, out_uncond = out.chunk(2)  # (B, ...) each
        return out_uncond + self.cfg_scale * (out_cond - out_uncond)


def _identity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return v


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path_type: str) -> torch.Tensor:
    """Score ``s = ∇ log p_t(x)`` of the interpolant ``x_t = α_t·x_0 + σ_t·ε`` from the velocity ``v``.

    With ``v = α̇·x_0 + σ̇·ε`` and ``s = −E[ε | x_t]/σ``, eliminating ``x_0`` gives
    ``s = (α/α̇·v − x) / (σ² − α/α̇·σ̇·σ)`` (SiT ``transport/path.py`` ``get_score_from_velocity``;
    REPA ``samplers.py``). For the linear path this is ``−(x + (1−t)·v)/t``. Computed in float64.
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(path_type, t)
    reverse_alpha_ratio = alpha / d_alpha
    var = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * v - x) / var


def _resolve_null_class(model: Model, null_class: int | None, needed: bool) -> int | None:
    """The null label: ``model.null_class`` (also via a DDP ``.module``), else the ``null_class`` kwarg."""
    owner = model if hasattr(model, "null_class") else getattr(model, "module", None)
    from_model = getattr(owner, "null_class", None)
    if from_model is not None and null_class is not None and int(from_model) != int(null_class):
        raise ValueError(f"null_class={null_class} conflicts with model.null_class={from_model}; pass one")
    resolved = from_model if from_model is not None else null_class
    if resolved is None and needed:
        raise ValueError(
            "cfg_scale > 1 needs the null (unconditional) label: the model has no `null_class` attribute, "
            "so pass null_class= (SiT uses num_classes)"
        )
    return None if resolved is None else int(resolved)


def _check_args(
    z: torch.Tensor,
    y: torch.Tensor,
    num_steps: int,
    min_steps: int,
    cfg_scale: float,
    guidance_low: float,
    guidance_high: float,
) -> None:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim < 2:
        what = f"shape {tuple(z.shape)}, dtype {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z: expected a floating tensor (B, C, ...) of initial noise, got {what}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        what = f"dtype {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y: expected an integer tensor of class labels, got {what}")
    if tuple(y.shape) != (z.shape[0],):
        raise ValueError(f"y: expected shape ({z.shape[0]},) (one label per row of z), got {tuple(y.shape)}")
    if y.device != z.device:
        raise ValueError(f"y is on {y.device} but z is on {z.device}; put both on the same device")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < min_steps:
        raise ValueError(f"num_steps: expected an integer >= {min_steps}, got {num_steps!r}")
    if not (math.isfinite(cfg_scale) and cfg_scale >= 1.0):
        raise ValueError(
            f"cfg_scale: expected a finite value >= 1 (1 = no guidance), got {cfg_scale!r}; "
            "the reference silently ignores values below 1, so they are rejected here"
        )
    if not (0.0 <= guidance_low <= guidance_high <= 1.0):
        raise ValueError(
            f"guidance interval: expected 0 <= guidance_low <= guidance_high <= 1, "
            f"got guidance_low={guidance_low!r}, guidance_high={guidance_high!r}"
        )


# --------------------------------------------------------------------------------------------------
#                                            Samplers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def euler_sampler(
    model: Model,
    z: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 50,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    *,
    null_class: int | None = None,
    model_dtype: torch.dtype | None = None,
    trace: SamplerTrace | None = None,
) -> torch.Tensor:
    """Probability-flow ODE ``dx/dt = v(x, t)`` from t=1 to t=0 by Euler (or Heun) on ``linspace(1, 0, N+1)``.

    Euler: ``x_{i+1} = x_i + (t_{i+1} − t_i)·v(x_i, t_i)`` (NFE N). Heun (``heun=True``) corrects every step
    but the last with ``v' = v(x_{i+1}, t_{i+1})``: ``x_{i+1} = x_i + Δ·(v + v')/2`` (NFE 2N−1); the second
    evaluation reuses the guidance decision of ``t_i`` (as the reference). CFG acts on the velocity.

    ``z`` (B, C, H, W) is the noise at t=1 (its dtype is the model's input dtype unless ``model_dtype`` is
    given), ``y`` (B,) int labels. Returns the float64 sample at t=0; the caller casts it.
    """
    _check_args(z, y, num_steps, 1, cfg_scale, guidance_low, guidance_high)
    null_class = _resolve_null_class(model, null_class, needed=cfg_scale > 1.0)
    evaluate = _Evaluator(model, y, cfg_scale, null_class, model_dtype or z.dtype, trace)
    t_steps = ode_time_grid(num_steps, device=z.device)  # (N+1,) float64
    if trace is not None:
        trace.t_steps = t_steps.cpu()

    x = z.to(torch.float64)  # (B, C, H, W) float64 state
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        guided = _is_guided(t_cur.item(), cfg_scale, guidance_low, guidance_high)
        if trace is not None:
            trace.guided.append(guided)
        v = evaluate(x, t_cur, guided, _identity)
        x_next = x + (t_next - t_cur) * v
        if heun and i < num_steps - 1:
            v_prime = evaluate(x_next, t_next, guided, _identity)
            x_next = x + (t_next - t_cur) * (0.5 * v + 0.5 * v_prime)
        x = x_next
    return x


@torch.no_grad()
def euler_maruyama_sampler(
    model: Model,
    z: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    *,
    null_class: int | None = None,
    model_dtype: torch.dtype | None = None,
    trace: SamplerTrace | None = None,
) -> torch.Tensor:
    """Reverse-time SDE by Euler–Maruyama on ``cat(linspace(1, 0.04, N), [0])`` (NFE N).

    With diffusion ``w(t) = 2t`` (whatever the path; SiT ``--diffusion-form sigma``), score ``s`` from the
    velocity through the interpolant of ``path_type`` (``score_from_velocity``) and drift
    ``d = v − ½·w·s``, each of the first N−1 steps (``Δ = t_{i+1} − t_i < 0``) is

        x_{i+1} = x_i + d·Δ + sqrt(w(t_i))·ε_i·sqrt(|Δ|),    ε_i ~ N(0, I),

    and the last step 0.04 → 0 returns the mean ``x + Δ·d`` with no noise. CFG acts on the drift (the same
    as on v, the score being affine in v). For the linear path ``d = v + (x + (1−t)·v)``.

    Noise protocol (matches the golden file): for each stochastic step in order,
    ``ε_i = torch.randn(x.shape, generator=generator, dtype=float64, device=x.device)`` on the B-sized state
    (the global RNG when ``generator`` is None, as the reference's ``randn_like``). Alternatively ``noise``
    (N−1, B, C, H, W) gives every ε_i (tests, other frameworks). Returns the float64 sample at t=0.
    """
    _check_args(z, y, num_steps, 2, cfg_scale, guidance_low, guidance_high)
    interpolant(path_type, torch.ones((), dtype=torch.float64))  # fail early on an unknown path_type
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either generator= or noise=, not both")
        expected = (num_steps - 1, *z.shape)
        if tuple(noise.shape) != expected or not noise.is_floating_point():
            raise ValueError(
                f"noise: expected a floating tensor of shape {expected} (one ε per stochastic step), "
                f"got {tuple(noise.shape)} {noise.dtype}"
            )
        noise = noise.to(device=z.device, dtype=torch.float64)
    null_class = _resolve_null_class(model, null_class, needed=cfg_scale > 1.0)
    evaluate = _Evaluator(model, y, cfg_scale, null_class, model_dtype or z.dtype, trace)
    t_steps = sde_time_grid(num_steps, device=z.device)  # (N+1,) float64
    if trace is not None:
        trace.t_steps = t_steps.cpu()

    def drift(v: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        diffusion = 2.0 * t  # w(t)
        return v - 0.5 * diffusion * score_from_velocity(v, x_in, t, path_type)

    x = z.to(torch.float64)  # (B, C, H, W) float64 state
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur
        guided = _is_guided(t_cur.item(), cfg_scale, guidance_low, guidance_high)
        if trace is not None:
            trace.guided.append(guided)
        if i == num_steps - 1:  # last step 0.04 -> 0: deterministic mean, no noise
            x = x + dt * evaluate(x, t_cur, guided, drift)
            break
        # Drawn before the model call, as the reference, so the global-RNG stream matches it too.
        if noise is not None:
            eps = noise[i]
        else:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        d = evaluate(x, t_cur, guided, drift)
        diffusion = 2.0 * t_cur
        x = x + d * dt + torch.sqrt(diffusion) * (eps * torch.sqrt(torch.abs(dt)))
    return x


def sample(
    model: Model,
    z: torch.Tensor,
    y: torch.Tensor,
    sampler: str = "sde",
    num_steps: int | None = None,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    null_class: int | None = None,
    model_dtype: torch.dtype | None = None,
    trace: SamplerTrace | None = None,
) -> torch.Tensor:
    """Run the sampler named ``sampler`` (one of ``SAMPLERS``); ``num_steps`` defaults per sampler
    (``DEFAULT_NUM_STEPS``). ``path_type``, ``generator`` and ``noise`` only matter for the SDE (the ODE
    samplers are deterministic and path-independent, as in the reference). Returns float64."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choices: {', '.join(SAMPLERS)}")
    steps = DEFAULT_NUM_STEPS[sampler] if num_steps is None else num_steps
    common = dict(null_class=null_class, model_dtype=model_dtype, trace=trace)
    if sampler == "sde":
        return euler_maruyama_sampler(
            model, z, y, steps, cfg_scale, guidance_low, guidance_high, path_type, generator, noise, **common
        )
    return euler_sampler(
        model, z, y, steps, sampler == "ode_heun", cfg_scale, guidance_low, guidance_high, **common
    )
