"""Samplers: golden parity with the official REPA samplers.py, guidance interval, null class, arguments."""

from __future__ import annotations

import math

import pytest
import torch

from repa.models import SiT
from repa.sampling import (
    DEFAULT_NUM_STEPS,
    SAMPLERS,
    SamplerTrace,
    euler_maruyama_sampler,
    euler_sampler,
    ode_time_grid,
    sample,
    sde_time_grid,
)
from tests.support.golden import golden, guidance, guided_steps, meta, sit_model, tensor, time_grid
from tests.support.tiny_runs import perturb

ATOL = 1e-5  # golden README: sample.ode_*, sample.sde_* (float32 model, float64 state)


def N() -> int:
    return meta("sample_num_steps")


def cfg_settings() -> dict:
    return guidance()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: threads only add contention on the shared CPU (1 vs 2 threads is bit-identical here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> SiT:
    return sit_model()


@pytest.fixture(scope="module")
def zy() -> tuple[torch.Tensor, torch.Tensor]:
    return tensor("sample.z"), tensor("sample.y")


class Recorder(torch.nn.Module):
    """Wraps a model and records what each call saw (x dtype, t, labels)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[torch.dtype, torch.Tensor, torch.Tensor]] = []

    @property
    def null_class(self) -> int:
        return self.inner.null_class

    def forward(self, x, t, y):
        self.calls.append((x.dtype, t.clone(), y.clone()))
        return self.inner(x, t, y)


def tiny_sit(num_classes: int = 10) -> SiT:
    torch.manual_seed(0)
    m = SiT(
        input_size=8,
        patch_size=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        encoder_depth=1,
        z_dims=(8,),
        projector_dim=16,
        num_classes=num_classes,
    )
    return perturb(m).eval()  # adaLN-Zero makes the output 0 at init; give it a non-trivial output


# ------------------------------------------------------------------------------------------------
# Golden parity
# ------------------------------------------------------------------------------------------------

ODE_RUNS = {  # golden key suffix -> euler_sampler kwargs
    "ode_euler_{N}": dict(heun=False),
    "ode_heun_{N}": dict(heun=True),
    "ode_euler_{N}_cfg": dict(heun=False, cfg=True),
}


@pytest.mark.parametrize("run", list(ODE_RUNS))
def test_ode_matches_reference_samples_nfe_and_guidance(model, zy, run):
    z, y = zy
    key = "sample." + run.format(N=N())
    kwargs = dict(ODE_RUNS[run])
    if kwargs.pop("cfg", False):
        kwargs.update(cfg_settings())
    trace = SamplerTrace()
    out = euler_sampler(model, z, y, num_steps=N(), trace=trace, **kwargs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, tensor(key), atol=ATOL, rtol=0)
    assert trace.nfe == tensor(key + "_nfe").item()
    assert torch.equal(trace.t_steps, tensor("sample.ode_t_steps"))
    if key + "_guided" in golden():
        assert trace.guided == tensor(key + "_guided").bool().tolist()


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_sde_matches_reference_with_generator_protocol(model, zy, cfg):
    z, y = zy
    key = f"sample.sde_{N()}" + ("_cfg" if cfg else "")
    trace = SamplerTrace()
    gen = torch.Generator().manual_seed(meta("sde_seed"))
    kwargs = cfg_settings() if cfg else {}
    out = euler_maruyama_sampler(
        model, z, y, num_steps=N(), path_type=meta("path_type"), generator=gen, trace=trace, **kwargs
    )
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, tensor(key), atol=ATOL, rtol=0)
    assert trace.nfe == tensor(key + "_nfe").item()
    assert torch.equal(trace.t_steps, tensor("sample.sde_t_steps"))
    if cfg:
        assert trace.guided == tensor(key + "_guided").bool().tolist()


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_sde_matches_reference_with_injected_noise(model, zy, cfg):
    z, y = zy
    key = f"sample.sde_{N()}" + ("_cfg" if cfg else "")
    kwargs = cfg_settings() if cfg else {}
    out = euler_maruyama_sampler(
        model, z, y, num_steps=N(), path_type=meta("path_type"), noise=tensor("sample.sde_noise"), **kwargs
    )
    torch.testing.assert_close(out, tensor(key), atol=ATOL, rtol=0)


def test_sde_noise_protocol_draws_the_recorded_noise():
    z = tensor("sample.z")
    gen = torch.Generator().manual_seed(meta("sde_seed"))
    draws = torch.stack([torch.randn(z.shape, generator=gen, dtype=torch.float64) for _ in range(N() - 1)])
    assert torch.equal(draws, tensor("sample.sde_noise"))


def test_sde_without_generator_uses_global_rng_like_the_reference(model, zy):
    z, y = zy
    torch.manual_seed(meta("sde_seed"))
    out = euler_maruyama_sampler(model, z, y, num_steps=N(), path_type=meta("path_type"))
    torch.testing.assert_close(out, tensor(f"sample.sde_{N()}"), atol=ATOL, rtol=0)


def test_time_grids_equal_reference_grids_exactly():
    assert torch.equal(ode_time_grid(N()), tensor("sample.ode_t_steps"))
    assert torch.equal(sde_time_grid(N()), tensor("sample.sde_t_steps"))


@pytest.mark.parametrize("name", SAMPLERS)
def test_sample_dispatch_equals_direct_call(model, zy, name):
    z, y = zy
    kw = dict(num_steps=3, **cfg_settings())
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    got = sample(model, z, y, sampler=name, generator=gen(), **kw)
    if name == "sde":
        want = euler_maruyama_sampler(model, z, y, generator=gen(), **kw)
    else:
        want = euler_sampler(model, z, y, heun=name == "ode_heun", **kw)
    assert torch.equal(got, want)


def test_sample_defaults_to_reference_step_counts(zy):
    z, y = zy
    calls = []

    def velocity_zero(x, t, y):
        calls.append(1)
        return torch.zeros_like(x), []

    for name in SAMPLERS:
        calls.clear()
        trace = SamplerTrace()
        sample(velocity_zero, z, y, sampler=name, trace=trace)
        expected = 2 * DEFAULT_NUM_STEPS[name] - 1 if name == "ode_heun" else DEFAULT_NUM_STEPS[name]
        assert trace.nfe == len(calls) == expected
    assert DEFAULT_NUM_STEPS["sde"] == 250 and DEFAULT_NUM_STEPS["ode_euler"] == 50


# ------------------------------------------------------------------------------------------------
# Guidance interval, null class, calling convention
# ------------------------------------------------------------------------------------------------


def test_guidance_interval_includes_both_bounds(model, zy):
    z, y = zy
    if N() < 4:
        pytest.skip(f"meta_sample_num_steps={N()}: needs 4 steps for interior bounds with steps outside")
    grid = time_grid("ode")
    low, high = grid[N() - 2], grid[2]  # exact grid values: inclusive bounds must guide these steps
    trace = SamplerTrace()
    euler_sampler(model, z, y, N(), cfg_scale=1.5, guidance_low=low, guidance_high=high, trace=trace)
    assert trace.guided == [low <= t <= high for t in grid[:-1]]
    assert trace.guided[2] and trace.guided[N() - 2] and not trace.guided[1] and not trace.guided[N() - 1]


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_exclusive_upper_bound_would_be_caught_by_the_golden(model, zy, sampler):
    # Where the golden's guidance_high is a point of a sampler's grid, an exclusive bound (t < high) skips
    # guidance at that step and moves the sample by far more than ATOL, so the parity tests above detect
    # that mistake. A grid without that point does not exercise the bound.
    z, y = zy
    settings = cfg_settings()
    high, grid = settings["guidance_high"], time_grid(sampler)
    if settings["cfg_scale"] <= 1:
        pytest.skip(f"meta_sample_cfg_scale={settings['cfg_scale']}: the golden runs use no guidance")
    if high not in grid[:-1]:
        pytest.skip(f"meta_sample_guidance_high={high} is not a step of the golden {sampler} grid {grid}")
    step = grid.index(high)
    assert guided_steps(sampler)[step]  # the inclusive interval guides it (low <= high)
    key = f"sample.ode_euler_{N()}_cfg" if sampler == "ode" else f"sample.sde_{N()}_cfg"
    assert tensor(key + "_guided").bool().tolist()[step]
    settings["guidance_high"] = math.nextafter(high, 0.0)
    trace = SamplerTrace()
    if sampler == "ode":
        out = euler_sampler(model, z, y, N(), trace=trace, **settings)
    else:
        noise = tensor("sample.sde_noise")
        out = euler_maruyama_sampler(
            model, z, y, N(), path_type=meta("path_type"), noise=noise, trace=trace, **settings
        )
    assert not trace.guided[step]  # so the trace differs from the stored one there
    assert (out - tensor(key)).abs().max() > 10 * ATOL


def test_guided_steps_double_the_batch_with_the_null_label_and_unguided_steps_do_not(model, zy):
    z, y = zy
    rec = Recorder(model)
    trace = SamplerTrace()
    euler_sampler(rec, z, y, N(), trace=trace, **cfg_settings())
    B = z.shape[0]
    for (dtype, t, labels), guided in zip(rec.calls, trace.guided):
        assert dtype == z.dtype and t.dtype == z.dtype and t.shape == labels.shape
        if guided:
            assert torch.equal(labels, torch.cat([y, torch.full_like(y, model.null_class)]))
        else:
            assert torch.equal(labels, y) and labels.shape == (B,)
    assert trace.forward_equivalents == trace.nfe + sum(trace.guided)


def test_heun_second_evaluation_reuses_the_guidance_decision_of_t_cur(model, zy):
    z, y = zy
    settings = cfg_settings()
    low, high = settings["guidance_low"], settings["guidance_high"]
    grid = time_grid("ode")
    # The last unguided step crosses into the interval (t_cur > high >= t_next >= low): its second call
    # (at t_next) must stay unguided, although t_next's own decision would guide it.
    crossing = [k for k in range(N() - 1) if grid[k] > high >= grid[k + 1] >= low]
    if settings["cfg_scale"] <= 1 or not crossing:
        pytest.skip(f"golden cfg {settings} on the ode grid {grid}: no Heun step enters the interval")
    i = crossing[0]
    rec = Recorder(model)
    trace = SamplerTrace()
    euler_sampler(rec, z, y, N(), heun=True, trace=trace, **settings)
    assert trace.nfe == len(rec.calls) == 2 * N() - 1
    assert trace.guided == guided_steps("ode")
    doubled = [labels.shape[0] == 2 * z.shape[0] for _, _, labels in rec.calls]
    # Calls come in (t_cur, t_next) pairs, except the single call of the last step.
    assert [doubled[2 * k] for k in range(N() - 1)] + [doubled[-1]] == trace.guided
    assert all(doubled[2 * k] == doubled[2 * k + 1] for k in range(N() - 1))
    assert rec.calls[2 * i + 1][1][0].item() == pytest.approx(grid[i + 1])
    assert not doubled[2 * i + 1] and doubled[2 * i + 2]


@pytest.mark.parametrize("name", SAMPLERS)
def test_null_class_follows_num_classes(name):
    # The reference hard-codes y_null = 1000 and crashes (IndexError) for a 10-class model with cfg > 1.
    model = tiny_sit(num_classes=10)
    rec = Recorder(model)
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([3, 9])
    gen = torch.Generator().manual_seed(0)
    out = sample(rec, z, y, sampler=name, num_steps=3, cfg_scale=2.0, generator=gen)
    assert torch.isfinite(out).all()
    assert any(torch.equal(labels, torch.tensor([3, 9, 10, 10])) for _, _, labels in rec.calls)


def test_null_class_kwarg_is_used_for_models_without_the_attribute(zy):
    z, y = zy
    seen = []

    def plain_model(x, t, labels):
        seen.append(labels)
        return torch.zeros_like(x), []

    euler_sampler(plain_model, z, y, 2, cfg_scale=2.0, null_class=7)
    assert torch.equal(seen[0], torch.cat([y, torch.full_like(y, 7)]))


def test_guidance_output_is_uncond_plus_scale_times_difference(zy):
    z, y = zy
    w = 1.8

    def label_model(x, t, labels):  # velocity = label, so cond = y and uncond = null per row
        return labels.to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone(), []

    out = euler_sampler(label_model, z, y, 1, cfg_scale=w, null_class=1000)
    v = 1000 + w * (y.double() - 1000)  # u + w (c - u)
    torch.testing.assert_close(out, z.double() - v.view(-1, 1, 1, 1), atol=1e-9, rtol=0)


def test_state_is_integrated_in_float64(zy):
    # A float32 state would swallow a velocity of 1e-9 added to values of order 1.
    z = torch.ones(2, 4, 8, 8)

    def tiny_velocity(x, t, y):
        assert x.dtype == torch.float32
        return torch.full_like(x, 1e-9), []

    out = euler_sampler(tiny_velocity, z, torch.zeros(2, dtype=torch.long), 4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.full_like(out, 1 - 1e-9), atol=1e-15, rtol=0)


def test_sde_last_step_is_deterministic_and_noise_only_enters_stochastic_steps(model, zy):
    z, y = zy
    noise = tensor("sample.sde_noise")
    a = euler_maruyama_sampler(model, z, y, N(), noise=noise)
    # Changing ε only on the last stochastic step changes the result; there is no ε for the last step.
    noise2 = noise.clone()
    noise2[-1] += 1.0
    b = euler_maruyama_sampler(model, z, y, N(), noise=noise2)
    assert (a - b).abs().max() > 1e-3


def test_samplers_do_not_touch_model_mode_or_build_graphs(model, zy):
    z, y = zy
    out = sample(model, z, y, sampler="ode_euler", num_steps=2)
    assert not out.requires_grad and not model.training


# ------------------------------------------------------------------------------------------------
# Argument validation
# ------------------------------------------------------------------------------------------------

BAD_ARGS = {
    "num_steps=0": (dict(sampler="ode_euler", num_steps=0), "num_steps"),
    "num_steps float": (dict(sampler="ode_euler", num_steps=2.0), "num_steps"),
    "sde num_steps=1": (dict(sampler="sde", num_steps=1), "num_steps"),
    "cfg_scale<1": (dict(cfg_scale=0.5), "cfg_scale"),
    "cfg_scale nan": (dict(cfg_scale=float("nan")), "cfg_scale"),
    "low>high": (dict(cfg_scale=1.5, guidance_low=0.8, guidance_high=0.7), "guidance"),
    "high>1": (dict(guidance_high=1.5), "guidance"),
    "low<0": (dict(guidance_low=-0.1), "guidance"),
    "unknown sampler": (dict(sampler="ddim"), "choices: sde, ode_euler, ode_heun"),
    "unknown path": (dict(sampler="sde", path_type="vp"), "path_type"),
    "noise shape": (dict(sampler="sde", num_steps=3, noise=torch.zeros(3, 4, 4, 8, 8)), "noise"),
    "generator and noise": (
        dict(sampler="sde", num_steps=2, noise=torch.zeros(1, 4, 4, 8, 8), generator=torch.Generator()),
        "generator",
    ),
    "conflicting null_class": (dict(cfg_scale=2.0, null_class=5), "null_class"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_value_error_naming_the_field(model, zy, case):
    z, y = zy
    kwargs, fragment = BAD_ARGS[case]
    kwargs = {"num_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        sample(model, z, y, **kwargs)


@pytest.mark.parametrize(
    "z, y, fragment",
    [
        (torch.zeros(4, 4, 8, 8), torch.zeros(3, dtype=torch.long), r"y: expected shape \(4,\)"),
        (torch.zeros(4, 4, 8, 8), torch.zeros(4), "integer"),
        (torch.zeros(4, 4, 8, 8, dtype=torch.long), torch.zeros(4, dtype=torch.long), "z: expected a float"),
    ],
)
def test_bad_inputs_raise_value_error(model, z, y, fragment):
    with pytest.raises(ValueError, match=fragment):
        euler_sampler(model, z, y, 2)


def test_cfg_without_any_null_class_is_a_value_error(zy):
    z, y = zy
    with pytest.raises(ValueError, match="null_class"):
        euler_sampler(lambda x, t, y: (x, []), z, y, 2, cfg_scale=2.0)
