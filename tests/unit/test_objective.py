"""REPALoss: parity with the official SILoss (golden file), interpolants, time sampling, alignment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repa.models import SiT
from repa.objective import PATH_TYPES, TIME_SAMPLINGS, REPALoss, interpolant, negative_cosine, sample_time
from tests.support.golden import interpolate, meta, per_projector, sit_model, tensor

golden_model = sit_model  # eval mode: the golden run never drops labels


def golden_inputs():
    return tensor("loss.x"), tensor("loss.y"), [tensor(k) for k in per_projector("loss.zs.")]


def golden_loss() -> REPALoss:
    """REPALoss with the golden SILoss settings (the reference's ``--weighting`` is repa's time_sampling)."""
    if meta("prediction") != "v":
        pytest.skip(f"golden prediction={meta('prediction')!r}: REPALoss (like SILoss) predicts v only")
    if meta("path_type") not in PATH_TYPES or meta("weighting") not in TIME_SAMPLINGS:
        pytest.skip(f"golden path_type={meta('path_type')!r}, weighting={meta('weighting')!r}: not in repa")
    return REPALoss(
        path_type=meta("path_type"), time_sampling=meta("weighting"), proj_coeff=meta("proj_coeff")
    )


def global_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def tiny(z_dims=(16,), **overrides) -> SiT:
    torch.manual_seed(0)
    kwargs = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, encoder_depth=1)
    kwargs.update(z_dims=z_dims, projector_dim=24, num_classes=10, class_dropout_prob=0.0)
    model = SiT(**{**kwargs, **overrides})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave adaLN-Zero init so every parameter gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p += 0.02 * torch.randn(p.shape, generator=gen)
    return model


def tiny_batch(model: SiT, batch: int = 3):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    zs = [torch.randn(batch, 16, z, generator=gen) for z in model.z_dims]
    return x, y, zs


# ----------------------------------------------------------------------------- golden parity


def check_golden(out, model):
    torch.testing.assert_close(out.x_t, tensor("loss.x_t"), atol=2e-6, rtol=0)
    torch.testing.assert_close(out.v_pred, tensor("loss.model_output"), atol=1e-5, rtol=0)
    for i, key in enumerate(per_projector("loss.zs_tilde.")):
        torch.testing.assert_close(out.zs_proj[i], tensor(key), atol=1e-5, rtol=0)
    per_sample = tensor("loss.denoising_per_sample")
    torch.testing.assert_close(out.denoising_per_sample, per_sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.projection, tensor("loss.proj"), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.total, tensor("loss.total"), atol=1e-5, rtol=0)
    out.total.backward()
    torch.testing.assert_close(global_grad_norm(model), tensor("loss.grad_norm"), rtol=1e-5, atol=0)


def drawn_golden_loss():
    """The golden loss with t and noise drawn from the global RNG after ``manual_seed(meta_loss_seed)``."""
    model, (x, y, zs) = golden_model(), golden_inputs()
    torch.manual_seed(meta("loss_seed"))
    return model, golden_loss()(model, x, y, zs)


def check_draws(out):
    """t then noise were drawn as the reference drew them: ``loss.t``, and ``loss.noise`` in x_t
    (built with the interpolant of meta_path_type)."""
    assert torch.equal(out.t, tensor("loss.t"))
    assert torch.equal(out.x_t, interpolate(tensor("loss.x"), out.t, tensor("loss.noise")))


def test_loss_draws_t_then_noise_like_the_reference_and_matches_golden():
    model, out = drawn_golden_loss()
    check_draws(out)
    check_golden(out, model)


def test_injected_t_and_noise_match_golden():
    model, (x, y, zs) = golden_model(), golden_inputs()
    out = golden_loss()(model, x, y, zs, t=tensor("loss.t"), noise=tensor("loss.noise"))
    check_golden(out, model)


def test_alignment_is_mean_cosine_and_total_combines_terms():
    model, (x, y, zs) = golden_model(), golden_inputs()
    out = golden_loss()(model, x, y, zs, t=tensor("loss.t"), noise=tensor("loss.noise"))
    torch.testing.assert_close(out.alignment, -tensor("loss.proj"), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.total, out.denoising + meta("proj_coeff") * out.projection)
    assert out.denoising == out.denoising_per_sample.mean()


def test_generator_draws_t_then_noise_from_it():
    model = tiny()
    x, y, zs = tiny_batch(model)
    out = REPALoss()(model, x, y, zs, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    t = torch.rand((3, 1, 1, 1), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    assert torch.equal(out.t, t.flatten())
    assert torch.equal(out.x_t, (1 - t) * x + t * noise)


# ----------------------------------------------------------------------------- interpolants and time sampling


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_interpolant_goes_from_data_at_t0_to_noise_at_t1_with_exact_derivatives(path_type):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = interpolant(path_type, t)
    a0, s0, _, _ = interpolant(path_type, torch.zeros(1, dtype=torch.float64))
    a1, s1, _, _ = interpolant(path_type, torch.ones(1, dtype=torch.float64))
    assert [v.item() for v in (a0, s0, a1, s1)] == pytest.approx([1, 0, 0, 1], abs=1e-15)
    h = 1e-6
    a_p, s_p, _, _ = interpolant(path_type, t + h)
    a_m, s_m, _, _ = interpolant(path_type, t - h)
    torch.testing.assert_close(d_alpha, (a_p - a_m) / (2 * h), atol=1e-8, rtol=0)
    torch.testing.assert_close(d_sigma, (s_p - s_m) / (2 * h), atol=1e-8, rtol=0)
    if path_type == "cosine":  # variance preserving
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    else:
        torch.testing.assert_close(alpha + sigma, torch.ones_like(t))


def test_cosine_path_target_is_the_time_derivative_of_x_t():
    model = tiny()
    x, y, zs = tiny_batch(model)
    noise = torch.randn_like(x)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x64, n64 = x.double(), noise.double()

    def x_t(tt):
        alpha, sigma, _, _ = interpolant("cosine", tt.view(-1, 1, 1, 1))
        return alpha * x64 + sigma * n64

    _, _, d_alpha, d_sigma = interpolant("cosine", t.view(-1, 1, 1, 1))
    v_target = d_alpha * x64 + d_sigma * n64
    torch.testing.assert_close(v_target, (x_t(t + 1e-6) - x_t(t - 1e-6)) / 2e-6, atol=1e-6, rtol=0)
    # the loss uses exactly that target: a model predicting it has zero denoising loss
    out = REPALoss(path_type="cosine")(model, x, y, zs, t=t.float(), noise=noise)
    alpha, sigma, _, _ = interpolant("cosine", t.float().view(-1, 1, 1, 1))
    torch.testing.assert_close(out.x_t, alpha * x + sigma * noise)
    expected = (out.v_pred.detach() - v_target.float()).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.denoising_per_sample.detach(), expected)


def test_uniform_time_sampling_is_in_unit_interval_with_shape_b111():
    t = sample_time(4096, "uniform", generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096, 1, 1, 1)
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_lognormal_time_sampling_maps_log_sigma_normal_to_t(path_type):
    t = sample_time(20_000, "lognormal", path_type, generator=torch.Generator().manual_seed(0)).flatten()
    assert ((t > 0) & (t < 1)).all()
    alpha, sigma, _, _ = interpolant(path_type, t.double())
    log_snr = torch.log(sigma / alpha)  # = the drawn log sigma, ~ N(0, 1)
    assert abs(log_snr.mean().item()) < 0.03 and abs(log_snr.std().item() - 1) < 0.03
    assert abs(t.median().item() - 0.5) < 0.02  # sigma = 1 <=> t = 0.5 for both paths
    torch.manual_seed(5)
    drawn = torch.randn(20_000).exp()
    torch.manual_seed(5)  # one randn draw, from the global RNG when no generator is given
    expected = drawn / (1 + drawn) if path_type == "linear" else 2 / math.pi * torch.atan(drawn)
    torch.testing.assert_close(sample_time(20_000, "lognormal", path_type).flatten(), expected)


# ----------------------------------------------------------------------------- alignment switches


def projector_grads(model: SiT) -> list[torch.Tensor | None]:
    return [p.grad for p in model.projectors.parameters()]


def test_no_targets_is_vanilla_sit_loss():
    model = tiny()
    x, y, _ = tiny_batch(model)
    out = REPALoss()(model, x, y, None, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(out.alignment) and out.projection == 0  # "not computed", still a loggable tensor
    assert torch.equal(out.total, out.denoising)
    out.total.backward()
    assert all(g is None for g in projector_grads(model))
    vanilla = tiny(z_dims=())
    out = REPALoss()(vanilla, x, y, [], generator=torch.Generator().manual_seed(0))
    assert out.zs_proj == [] and torch.equal(out.total, out.denoising)


def test_proj_coeff_zero_reports_alignment_without_gradient():
    model = tiny()
    x, y, zs = tiny_batch(model)
    out = REPALoss(proj_coeff=0.0)(model, x, y, zs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.total, out.denoising)
    assert torch.isfinite(out.alignment) and not out.projection.requires_grad
    torch.testing.assert_close(out.alignment, -out.projection)
    out.total.backward()
    assert all(g is None for g in projector_grads(model))


def test_alignment_stops_after_align_until_step():
    """align_until_step=N: exactly N updates (0-based steps 0..N-1) align, update N does not."""
    loss_fn = REPALoss(proj_coeff=0.5, align_until_step=100)
    assert [s for s in range(200) if loss_fn.alignment_active(s)] == list(range(100))
    assert not any(REPALoss(align_until_step=0).alignment_active(s) for s in range(3))
    model = tiny()
    x, y, zs = tiny_batch(model)
    draws = dict(t=torch.full((3,), 0.3), noise=torch.randn_like(x))
    on = loss_fn(model, x, y, zs, step=99, **draws)
    torch.testing.assert_close(on.total, on.denoising + 0.5 * on.projection)
    on.total.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in projector_grads(model))

    model.zero_grad(set_to_none=True)
    off = loss_fn(model, x, y, zs, step=100, **draws)
    assert torch.equal(off.total, off.denoising)
    torch.testing.assert_close(off.projection, on.projection.detach())  # still reported for logging
    off.total.backward()
    assert all(g is None for g in projector_grads(model))

    with pytest.raises(ValueError, match="pass step="):
        loss_fn(model, x, y, zs)


def test_projection_is_negative_cosine_mean_over_tokens_batch_and_encoders():
    model = tiny(z_dims=(16, 8))
    x, y, zs = tiny_batch(model)
    draws = dict(t=torch.full((3,), 0.5), noise=torch.randn_like(x))
    out = REPALoss()(model, x, y, zs, **draws)
    expected = [
        -F.cosine_similarity(
            z,
            zp.detach(),
            dim=-1,
        ).mean()
        for z, zp in zip(zs, out.zs_proj)
    ]
    torch.testing.assert_close(out.projection.detach(), torch.stack(expected).mean())
    # perfectly aligned targets give -1
    aligned = [zp.detach() * 3.0 for zp in out.zs_proj]
    out = REPALoss()(model, x, y, aligned, **draws)
    torch.testing.assert_close(out.projection.detach(), torch.tensor(-1.0))


def test_target_count_and_shape_mismatches_name_the_problem():
    model = tiny(z_dims=(16, 8))
    x, y, zs = tiny_batch(model)
    with pytest.raises(ValueError, match=r"1 target feature tensor\(s\) given but the model has 2 projector"):
        REPALoss()(model, x, y, zs[:1])
    bad = [zs[0], torch.randn(3, 16, 9)]
    with pytest.raises(ValueError, match=r"zs_target\[1\]: expected shape \(3, 16, 8\).*got \(3, 16, 9\)"):
        REPALoss()(model, x, y, bad)
    with pytest.raises(ValueError, match="projector"):
        REPALoss()(tiny(z_dims=()), x, y, zs)


def test_bad_t_and_noise_shapes_raise():
    model = tiny()
    x, y, zs = tiny_batch(model)
    with pytest.raises(ValueError, match=r"t: expected shape \(3,\) or \(3, 1, 1, 1\), got \(2,\)"):
        REPALoss()(model, x, y, zs, t=torch.rand(2))
    with pytest.raises(ValueError, match=r"noise: expected shape \(3, 4, 8, 8\)"):
        REPALoss()(model, x, y, zs, noise=torch.randn(3, 4, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(path_type="edm"), "path_type='edm'"),
        (dict(time_sampling="logit"), "time_sampling='logit'"),
        (dict(proj_coeff=-0.1), "proj_coeff"),
        (dict(proj_coeff=float("nan")), "proj_coeff"),
        (dict(align_until_step=-1), "align_until_step"),
    ],
)
def test_invalid_loss_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        REPALoss(**kwargs)


# ----------------------------------------------------------------------------- half precision


def test_half_precision_projection_has_no_nan_where_naive_normalisation_fails():
    # fp16: 768 entries of 300 -> squared norm 6.9e7 > 65504 (overflow); 1e-4 -> squares underflow to 0
    # and the 1e-12 eps rounds to 0 in fp16 (0/0). REPA issue #46 saw the fp16 loss turn NaN.
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(2, 4, 768, generator=gen)
    scales = torch.tensor([300.0, 1e-4]).view(2, 1, 1)
    z_target = (direction * scales).half()
    z_proj = (direction + 0.5 * torch.randn(2, 4, 768, generator=gen)).half() * 200

    def naive(z):  # normalisation computed in the input dtype
        return z / z.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)

    naive_loss = -(naive(z_target) * naive(z_proj)).sum(-1).mean(-1)
    reference = -F.cosine_similarity(z_target.double(), z_proj.double(), dim=-1).mean(-1)
    assert not torch.isfinite(naive_loss).all() or (naive_loss.double() - reference).abs().max() > 0.1

    for dtype in (torch.float16, torch.bfloat16):
        ours = negative_cosine(z_target.to(dtype), z_proj.to(dtype))
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        torch.testing.assert_close(ours.double(), reference, atol=1e-2, rtol=0)


def test_loss_with_a_bfloat16_model_and_fp16_targets_is_finite():
    model = tiny().to(torch.bfloat16)
    x, y, zs = tiny_batch(model)
    zs = [(z * 1000).half() for z in zs]  # squared norms far beyond fp16 range
    out = REPALoss()(model, x.bfloat16(), y, zs, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.total) and out.total.dtype == torch.float32
    expected = -F.cosine_similarity(zs[0].double(), out.zs_proj[0].detach().double(), dim=-1).mean()
    torch.testing.assert_close(out.projection.detach().double(), expected, atol=1e-3, rtol=0)
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
