"""The golden helper and the golden-parity tests follow the file's ``meta_*`` entries, not the public file.

Each test writes a modified copy of the golden file to tmp_path (another depth, path type, guidance
bound or step count; a dropped entry), points ``REPA_GOLDEN`` at it and runs the helper and the real
parity tests against it: they must adapt (or skip, naming what the file does not exercise), and fail
where the copy no longer matches what it claims.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.support.golden as G
import tests.unit.test_models as models_tests
import tests.unit.test_objective as objective_tests
import tests.unit.test_sampling as sampling_tests

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def use_variant(tmp_path, monkeypatch):
    """``use_variant(meta={...}, drop=prefixes, replace={...})``: write the modified copy, point
    ``REPA_GOLDEN`` at it (undone after the test) and return its path."""

    def use(meta: dict | None = None, drop: tuple[str, ...] = (), replace: dict | None = None) -> Path:
        arrays = {k: v for k, v in G.golden().items() if not k.startswith(drop or ("\0",))}
        for key, value in (meta or {}).items():
            assert "meta_" + key in arrays, key
            arrays["meta_" + key] = np.array(value)
        arrays.update(replace or {})
        path = tmp_path / f"golden_variant_{len(list(tmp_path.iterdir()))}.npz"
        np.savez(path, **arrays)
        monkeypatch.setenv("REPA_GOLDEN", str(path))
        return path

    return use


def sampler_inputs():
    return G.sit_model(), (G.tensor("sample.z"), G.tensor("sample.y"))


def test_helper_reads_the_file_named_by_repa_golden(use_variant):
    entries, high = len(G.golden()), G.meta("sample_guidance_high")
    path_type = "cosine" if G.meta("path_type") != "cosine" else "linear"
    new_high = 0.25 if high != 0.25 else 0.5
    path = use_variant(meta=dict(path_type=path_type, sample_guidance_high=new_high), drop=("enc.",))
    assert G.golden_path() == path
    assert (G.meta("path_type"), G.meta("sample_guidance_high")) == (path_type, new_high)
    assert not G.keys("enc.") and 0 < len(G.golden()) < entries
    assert G.guidance()["guidance_high"] == new_high
    low, scale = G.meta("sample_guidance_low"), G.meta("sample_cfg_scale")
    assert G.guided_steps("ode") == [scale > 1 and low <= t <= new_high for t in G.time_grid("ode")[:-1]]


def test_key_count_and_names_follow_meta_depth(use_variant):
    depth = G.meta("depth")
    if depth - 1 < G.meta("encoder_depth"):
        pytest.skip(f"depth {depth}: dropping a block would remove the projector tap")
    before = len(G.state_dict())
    last = f"sd.blocks.{depth - 1}."
    per_block = len(G.keys(last))
    assert per_block > 0
    use_variant(meta=dict(depth=depth - 1), drop=(last,))
    assert len(G.state_dict()) == len(G.official_sit_shapes()) == before - per_block
    models_tests.test_state_dict_names_and_shapes_equal_the_official_sit()  # strict load at depth - 1


def test_a_dropped_state_dict_entry_fails_the_key_test(use_variant):
    use_variant(drop=("sd.final_layer.linear.bias",))
    assert len(G.state_dict()) == len(G.official_sit_shapes()) - 1
    with pytest.raises(AssertionError):
        models_tests.test_state_dict_names_and_shapes_equal_the_official_sit()


def test_missing_projector_inputs_are_named_not_silently_skipped(use_variant):
    use_variant(drop=("loss.zs.0",))
    with pytest.raises(KeyError, match=r"loss\.zs\.0"):
        objective_tests.golden_inputs()


def test_cosine_golden_is_checked_with_the_cosine_interpolant(use_variant):
    if G.meta("path_type") != "linear" or G.meta("weighting") != "uniform":
        pytest.skip("needs a linear-path, uniform-t golden file to turn into a cosine one")
    use_variant(meta=dict(path_type="cosine"))
    model, out = objective_tests.drawn_golden_loss()
    assert out.t.shape == (G.meta("loss_batch"),)
    objective_tests.check_draws(out)  # uniform t: same draws; x_t from the cosine interpolant
    x, noise, t = G.tensor("loss.x"), G.tensor("loss.noise"), out.t.view(-1, 1, 1, 1)
    half_pi = math.pi / 2
    torch.testing.assert_close(out.x_t, torch.cos(half_pi * t) * x + torch.sin(half_pi * t) * noise)
    assert (out.x_t - ((1 - t) * x + t * noise)).abs().max() > 0.1  # the linear formula would fail here
    with pytest.raises(AssertionError):  # the stored outputs are the linear path's: parity must fail
        objective_tests.check_golden(out, model)


def test_samplers_take_the_path_type_from_meta(use_variant):
    if G.meta("path_type") != "linear":
        pytest.skip("needs a linear-path golden file to relabel")
    use_variant(meta=dict(path_type="cosine"))
    model, zy = sampler_inputs()
    # The ODE ignores the path (as upstream): still matches. The SDE score uses it: the stored linear
    # samples no longer match a cosine-path run.
    sampling_tests.test_ode_matches_reference_samples_nfe_and_guidance(model, zy, "ode_euler_{N}")
    with pytest.raises(AssertionError):
        sampling_tests.test_sde_matches_reference_with_injected_noise(model, zy, False)


def test_guidance_high_off_the_grid_skips_the_bound_test_and_heun_test_adapts(use_variant):
    grid, high = G.time_grid("ode"), G.meta("sample_guidance_high")
    below = max(t for t in grid if t < high)
    off = (high + below) / 2  # between two grid points
    use_variant(meta=dict(sample_guidance_high=off))
    assert off not in G.time_grid("ode") and G.guidance()["guidance_high"] == off
    assert G.guided_steps("ode") == [
        G.meta("sample_cfg_scale") > 1 and G.meta("sample_guidance_low") <= t <= off for t in grid[:-1]
    ]
    model, zy = sampler_inputs()
    with pytest.raises(pytest.skip.Exception, match="not a step of the golden ode grid"):
        sampling_tests.test_exclusive_upper_bound_would_be_caught_by_the_golden(model, zy, "ode")
    sampling_tests.test_heun_second_evaluation_reuses_the_guidance_decision_of_t_cur(model, zy)


def test_step_count_and_grids_come_from_the_file(use_variant):
    n = 3
    ode = np.linspace(1.0, 0.0, n + 1)
    sde = np.concatenate([np.linspace(1.0, 0.04, n), [0.0]])
    use_variant(meta=dict(sample_num_steps=n), replace={"sample.ode_t_steps": ode, "sample.sde_t_steps": sde})
    assert (
        sampling_tests.N() == n and G.time_grid("ode") == ode.tolist() and G.time_grid("sde") == sde.tolist()
    )
    model, zy = sampler_inputs()
    with pytest.raises(pytest.skip.Exception, match="meta_sample_num_steps=3"):
        sampling_tests.test_guidance_interval_includes_both_bounds(model, zy)
    if G.meta("sample_guidance_high") not in ode.tolist():
        with pytest.raises(pytest.skip.Exception, match="not a step of the golden ode grid"):
            sampling_tests.test_exclusive_upper_bound_would_be_caught_by_the_golden(model, zy, "ode")
    sampling_tests.test_heun_second_evaluation_reuses_the_guidance_decision_of_t_cur(model, zy)


def test_stored_guidance_flags_agree_with_the_meta_interval():
    """The file's ``_guided`` flags are the inclusive interval of its meta settings on its stored grids."""
    n = G.meta("sample_num_steps")
    for sampler, key in (("ode", f"sample.ode_euler_{n}_cfg_guided"), ("sde", f"sample.sde_{n}_cfg_guided")):
        if key in G.golden():
            assert G.guided_steps(sampler) == G.tensor(key).bool().tolist(), key
    if G.golden_path() == G.DEFAULT_GOLDEN:  # README: ode_t_steps[3] == 0.7; the SDE's first guided is 0.68
        high = G.meta("sample_guidance_high")
        assert high in G.time_grid("ode")[:-1] and high not in G.time_grid("sde")[:-1]
