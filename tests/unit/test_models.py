"""SiT: parity with the official REPA model (golden file), sizes, checkpoints and input checks."""

from __future__ import annotations

import argparse

import pytest
import torch

from repa.checkpoint import load_reference_state_dict
from repa.models import SiT, SiT_models, build_model, num_parameters
from repa.models.sit import LabelEmbedder
from repa.weights import WeightsError, load_torch_file
from tests.support.golden import (
    meta,
    official_sit_shapes,
    per_projector,
    sit_kwargs,
    sit_model,
    state_dict,
    tensor,
)

golden_kwargs = sit_kwargs
golden_model = sit_model


def tiny(**overrides) -> SiT:
    kwargs = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, encoder_depth=2)
    kwargs.update(z_dims=(16,), projector_dim=24, num_classes=10)
    kwargs.update(overrides)
    return SiT(**kwargs)


def perturb_(model: SiT, seed: int = 0, std: float = 0.02) -> SiT:
    """Move off adaLN-Zero init (where every block is the identity and the output is 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p += std * torch.randn(p.shape, generator=gen)
    return model


# ----------------------------------------------------------------------------- golden parity


def test_state_dict_names_and_shapes_equal_the_official_sit():
    reference = {k: tuple(v.shape) for k, v in state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in SiT(**golden_kwargs()).state_dict().items()}
    # The file holds every key of the official layout for its meta_* sizes (58 for the public file).
    expected = official_sit_shapes()
    assert len(reference) == len(expected)
    assert reference == expected
    assert ours == reference
    golden_model()  # strict load


def test_seeded_init_reproduces_the_reference_weights_bit_exactly():
    # The golden weights are: official init after manual_seed(init_seed), then a seeded perturbation
    # rounded to bfloat16 (golden README). Same module order + same init calls => identical numbers.
    torch.manual_seed(meta("init_seed"))
    model = SiT(**golden_kwargs())
    gen = torch.Generator().manual_seed(meta("perturb_seed"))
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p += meta("perturb_std") * torch.randn(p.shape, generator=gen)
                p.copy_(p.to(torch.bfloat16).float())
    ours = model.state_dict()
    for name, value in state_dict().items():
        assert torch.equal(ours[name], value), name


def test_pos_embed_is_the_frozen_reference_sincos_table():
    model = SiT(**golden_kwargs())
    assert torch.equal(model.pos_embed, tensor("sd.pos_embed"))
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("fused_attn", [True, False])
def test_forward_matches_golden_velocity_and_projection(fused_attn):
    model = golden_model(fused_attn=fused_attn)
    with torch.no_grad():
        v, zs = model(tensor("loss.x_t"), tensor("loss.t"), tensor("loss.y"))
    torch.testing.assert_close(v, tensor("loss.model_output"), atol=1e-5, rtol=0)
    assert len(zs) == len(meta("z_dims"))
    for i, key in enumerate(per_projector("loss.zs_tilde.")):
        torch.testing.assert_close(zs[i], tensor(key), atol=1e-5, rtol=0)


def test_null_class_is_num_classes_and_has_its_own_row():
    model = SiT(**golden_kwargs())
    assert model.null_class == meta("num_classes")
    rows = model.y_embedder.embedding_table.num_embeddings
    assert rows == meta("num_classes") + 1 == state_dict()["y_embedder.embedding_table.weight"].shape[0]
    if meta("sample_cfg_scale") > 1:  # the golden's CFG runs used the reference's y_null (meta_null_class)
        assert model.null_class == meta("null_class")
    no_cfg = tiny(class_dropout_prob=0.0, use_cfg=False)
    assert no_cfg.y_embedder.embedding_table.num_embeddings == 10


def test_output_is_exactly_zero_at_init_adaln_zero():
    model = tiny().eval()
    x = torch.randn(2, 4, 8, 8)
    v, zs = model(x, torch.rand(2), torch.tensor([1, 2]))
    assert torch.count_nonzero(v) == 0
    assert zs[0].shape == (2, 16, 16)


# ----------------------------------------------------------------------------- sizes and table


@pytest.mark.parametrize(
    ("name", "expected"),
    [("SiT-B/2", 137_845_008), ("SiT-L/2", 465_955_600), ("SiT-XL/2", 683_242_512)],
)
def test_parameter_counts_match_the_reference(name, expected):
    with torch.device("meta"):  # no memory for the weights
        model = build_model(name, input_size=32, num_classes=1000, z_dims=(768,), projector_dim=2048)
    assert num_parameters(model) == expected
    pos = model.pos_embed.numel()
    assert num_parameters(model, trainable_only=True) == expected - pos


def test_table_has_every_size_and_patch_and_decoder_width_follows_hidden():
    assert sorted(SiT_models) == sorted(f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))
    with torch.device("meta"):
        for name in SiT_models:
            model = build_model(name)
            assert model.final_layer.linear.in_features == model.hidden_size
            assert model.patch_size == int(name.rsplit("/", 1)[1])


def test_sit_s_2_forward_works():
    torch.manual_seed(0)
    model = perturb_(build_model("SiT-S/2", input_size=8, depth=2, encoder_depth=1, num_classes=10)).eval()
    v, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 10]))
    assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    assert zs[0].shape == (2, 16, 768)


def test_build_model_applies_overrides():
    with torch.device("meta"):
        model = build_model("SiT-B/4", encoder_depth=4, z_dims=(768, 1024), num_classes=10)
    assert (model.depth, model.hidden_size, model.patch_size, model.encoder_depth) == (12, 768, 4, 4)
    assert [p[-1].out_features for p in model.projectors] == [768, 1024]
    assert model.null_class == 10


def test_unknown_model_name_lists_allowed_names():
    with pytest.raises(ValueError, match=r"unknown model 'SiT-XXL/2'.*SiT-XL/2"):
        build_model("SiT-XXL/2")


# ----------------------------------------------------------------------------- constructor and input checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(encoder_depth=4), r"encoder_depth=4 must be in \[0, depth=3\]"),
        (dict(encoder_depth=-1), r"encoder_depth=-1"),
        (dict(hidden_size=30, num_heads=4), r"hidden_size=30 is not divisible by num_heads=4"),
        (dict(input_size=9), r"input_size=9 is not divisible by patch_size=2"),
        (dict(depth=0, encoder_depth=0), r"depth=0"),
        (dict(class_dropout_prob=1.0), r"class_dropout_prob"),
        (dict(z_dims=(16, 0)), r"z_dims"),
    ],
)
def test_invalid_constructor_args_raise_value_error_naming_the_arg(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


@pytest.mark.parametrize("how", ["encoder_depth=0", "z_dims=()"])
def test_no_projector_means_vanilla_sit(how):
    model = tiny(encoder_depth=0) if how == "encoder_depth=0" else tiny(z_dims=())
    assert len(model.projectors) == 0
    assert not any(k.startswith("projectors.") for k in model.state_dict())
    v, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert zs == [] and v.shape == (2, 4, 8, 8)


@pytest.mark.parametrize(
    ("x_shape", "t_shape", "y", "message"),
    [
        ((2, 4, 16, 16), (2,), [1, 2], r"x: expected shape \(B, 4, 8, 8\), got \(2, 4, 16, 16\)"),
        ((2, 3, 8, 8), (2,), [1, 2], r"x: expected shape \(B, 4, 8, 8\), got \(2, 3, 8, 8\)"),
        ((4, 8, 8), (2,), [1, 2], r"x: expected shape"),
        ((2, 4, 8, 8), (2, 1), [1, 2], r"t: expected shape \(2,\).*got \(2, 1\)"),
        ((2, 4, 8, 8), (3,), [1, 2], r"t: expected shape \(2,\).*got \(3,\)"),
        ((2, 4, 8, 8), (2,), [1, 2, 3], r"y: expected shape \(2,\).*got \(3,\)"),
        ((2, 4, 8, 8), (2,), [1.0, 2.0], r"y: expected integer class ids"),
    ],
)
def test_bad_input_shapes_raise_value_error_with_expected_and_got(x_shape, t_shape, y, message):
    with pytest.raises(ValueError, match=message):
        tiny()(torch.randn(x_shape), torch.rand(t_shape), torch.tensor(y))


# ----------------------------------------------------------------------------- behaviour


def test_label_dropout_happens_only_in_train_mode():
    model = perturb_(tiny(class_dropout_prob=0.5))
    x, t, y = torch.randn(16, 4, 8, 8), torch.rand(16), torch.arange(16) % 10
    model.eval()
    v_eval, _ = model(x, t, y)
    torch.testing.assert_close(model(x, t, y)[0], v_eval, atol=0, rtol=0)

    model.train()
    torch.manual_seed(123)
    v_train, _ = model(x, t, y)
    torch.manual_seed(123)  # the same single torch.rand(B) draw the label embedder makes
    dropped = torch.rand(16) < 0.5
    assert 0 < dropped.sum() < 16
    model.eval()
    v_expected, _ = model(x, t, torch.where(dropped, model.null_class, y))
    torch.testing.assert_close(v_train, v_expected, atol=1e-6, rtol=0)


def test_label_embedder_force_drop_ids_selects_the_null_row():
    emb = LabelEmbedder(num_classes=5, hidden_size=3, dropout_prob=0.1)
    labels = torch.tensor([0, 1, 2])
    out = emb(labels, train=False, force_drop_ids=torch.tensor([0, 1, 0]))
    table = emb.embedding_table.weight
    assert torch.equal(out, torch.stack([table[0], table[5], table[2]]))


@pytest.mark.parametrize("encoder_depth", [1, 2, 3])
def test_projector_reads_the_output_of_block_encoder_depth(encoder_depth):
    model = perturb_(tiny(encoder_depth=encoder_depth, z_dims=(16, 8))).eval()
    captured = {}
    model.blocks[encoder_depth - 1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    _, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4]))
    h = captured["h"]  # (B, T, D) after block `encoder_depth`
    for projector, z in zip(model.projectors, zs):
        torch.testing.assert_close(z, projector(h), atol=1e-6, rtol=0)
    assert [z.shape[-1] for z in zs] == [16, 8]


# ----------------------------------------------------------------------------- checkpoints


def test_official_checkpoint_layout_round_trips_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    model, ema = perturb_(tiny(), seed=1), perturb_(tiny(), seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))[0].square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="SiT-XL/2", encoder_depth=2, proj_coeff=0.5, enc_type="dinov2-vit-b")
    path = tmp_path / "0050000.pt"
    checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
    torch.save({**checkpoint, "args": args, "steps": 50_000}, path)

    loaded = load_torch_file(str(path))
    assert loaded["args"].encoder_depth == 2 and loaded["steps"] == 50_000
    for which, source in [("ema", ema), ("model", model)]:
        fresh = tiny()
        fresh.load_state_dict(load_reference_state_dict(loaded, which), strict=True)
        for name, value in source.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], value), (which, name)


def test_wrapper_prefixes_are_stripped_from_ddp_or_compiled_state_dicts():
    sd = tiny().state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        wrapped = {"ema": {prefix + k: v for k, v in sd.items()}}
        assert list(load_reference_state_dict(wrapped)) == list(sd)
    assert list(load_reference_state_dict(sd)) == list(sd)  # bare state dict


def test_missing_checkpoint_entry_names_the_available_keys():
    with pytest.raises(ValueError, match=r"no 'ema' entry.*\['args', 'model'\]"):
        load_reference_state_dict({"model": {"a": 1}, "args": None})
    with pytest.raises(ValueError, match="expected a dict"):
        load_reference_state_dict([1, 2])


class Exploit:
    """An arbitrary class: unpickling it would run code chosen by the file's author."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


class PlainConfig:
    """A harmless-looking class: still refused, only argparse.Namespace is allowed."""

    def __init__(self) -> None:
        self.lr = 1e-4


def test_file_with_an_arbitrary_pickled_class_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny().state_dict(), "payload": Exploit()}, path)
    with pytest.raises(WeightsError, match="could not be loaded safely"):
        load_torch_file(str(path))
    path = tmp_path / "evil_torch.pt"
    torch.save({"ema": tiny().state_dict(), "args": PlainConfig()}, path)
    with pytest.raises(WeightsError, match="could not be loaded safely"):
        load_torch_file(str(path))


def test_qk_norm_builds_layernorms_on_queries_and_keys_and_runs():
    model = tiny(qk_norm=True)
    names = {k for k in model.state_dict() if ".attn.q_norm." in k or ".attn.k_norm." in k}
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.0.attn.k_norm.bias" in names
    v, _ = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
