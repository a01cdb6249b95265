"""repa.config: typed run config, presets, --set overrides, validation, generated docs and schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jsonschema
import pytest
import yaml

from repa import storage
from repa.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    TrainConfig,
    apply_overrides,
    list_presets,
    load_config,
)
from repa.config_export import field_docs, json_schema, markdown_docs

ROOT = Path(__file__).resolve().parents[2]


def _error(source=None, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return info.value


# ---------------------------------------------------------------------------- defaults and presets


def test_defaults_are_the_papers_sit_xl_2_repa_values():
    cfg = RunConfig()
    assert (cfg.model.name, cfg.model.encoder_depth, cfg.model.projector_dim) == ("SiT-XL/2", 8, 2048)
    assert cfg.model.class_dropout_prob == 0.1 and cfg.model.num_classes == 1000
    assert cfg.encoder.names == ["dinov2-vit-b"]
    assert (cfg.vae.name, cfg.vae.latents_scale, cfg.vae.latents_bias) == ("sd-vae-ft-mse", 0.18215, 0.0)
    assert (cfg.objective.path_type, cfg.objective.time_sampling, cfg.objective.proj_coeff) == (
        "linear",
        "uniform",
        0.5,
    )
    t = cfg.train
    assert (t.global_batch_size, t.max_steps, t.lr, t.weight_decay) == (256, 400_000, 1e-4, 0.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.max_grad_norm, t.ema_decay) == (
        0.9,
        0.999,
        1e-8,
        1.0,
        0.9999,
    )
    s = cfg.sample
    assert (s.sampler, s.num_steps, s.cfg_scale, s.guidance_low, s.guidance_high) == (
        "sde",
        250,
        1.8,
        0.0,
        0.7,
    )
    assert s.num_samples == 50_000


def test_section_defaults_are_not_shared_between_instances():
    a, b = RunConfig(), RunConfig()
    a.encoder.names.append("dinov2-vit-s")
    a.data.storage_options["anon"] = True
    assert b.encoder.names == ["dinov2-vit-b"] and b.data.storage_options == {}


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_validates_and_says_what_it_reproduces(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    first_line = (ROOT / "repa" / "configs" / f"{preset}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# ") and len(first_line) > 20
    jsonschema.validate(yaml.safe_load(cfg.to_yaml()), json_schema())


def test_presets_hold_the_paper_rows():
    assert set(list_presets()) >= {
        "sit-xl-2-repa",
        "sit-b-2-repa",
        "sit-l-2-repa",
        "sit-xl-2-vanilla",
        "toy-cpu",
    }
    xl, b, l, vanilla = (
        load_config(p) for p in ("sit-xl-2-repa", "sit-b-2-repa", "sit-l-2-repa", "sit-xl-2-vanilla")
    )
    assert (xl.model.name, xl.model.encoder_depth, xl.train.max_steps) == ("SiT-XL/2", 8, 400_000)
    assert (b.model.name, b.model.encoder_depth) == ("SiT-B/2", 4)  # paper Table 7, not train.py's 8
    assert (l.model.name, l.model.encoder_depth) == ("SiT-L/2", 8)
    assert vanilla.encoder.names == [] and vanilla.model.name == "SiT-XL/2"
    for cfg in (xl, b, l):
        assert (
            cfg.encoder.names == ["dinov2-vit-b"]
            and cfg.train.lr == 1e-4
            and cfg.train.global_batch_size == 256
        )


def test_toy_preset_is_tiny_cpu_fp32_on_pixels():
    cfg = load_config("toy-cpu")
    assert cfg.model.architecture() == {"depth": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 2}
    assert (cfg.vae.name, cfg.data.resolution, cfg.train.precision, cfg.train.device) == (
        "none",
        32,
        "fp32",
        "cpu",
    )
    assert cfg.encoder.names[0].startswith("timm:") and cfg.train.max_steps <= 100


def test_preset_name_yaml_suffix_and_file_path_load_the_same(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text((ROOT / "repa" / "configs" / "sit-b-2-repa.yaml").read_text())
    assert load_config("sit-b-2-repa") == load_config("sit-b-2-repa.yaml") == load_config(path)
    assert load_config(str(path)) == load_config(f"file://{path}")


def test_a_preset_key_is_the_base_the_other_keys_are_merged_over(tmp_path):
    """The Helm chart's ConfigMap: `preset:` plus overrides, resolved where repa is installed."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "preset: sit-b-2-repa\n"
        "data: {url: s3://b/imagenet-256}\n"
        "storage: {run_url: s3://b/runs/b2}\n"
        "train: {max_steps: 1000}\n"
    )
    cfg = load_config(path, ["train.lr=2e-4"])
    expected = load_config(
        "sit-b-2-repa",
        [
            "data.url=s3://b/imagenet-256",
            "storage.run_url=s3://b/runs/b2",
            "train.max_steps=1000",
            "train.lr=2e-4",
        ],
    )
    assert cfg == expected
    assert cfg.model.encoder_depth == 4 and cfg.train.global_batch_size == 256  # from the preset
    assert "preset" in json_schema()["properties"]  # so the chart's schema accepts config.preset


def test_an_unknown_preset_key_is_one_error_naming_the_key_and_the_closest_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: sit-b-2-rep\n")
    err = _error(str(path))
    assert str(err).startswith("preset: ") and "did you mean 'sit-b-2-repa'" in str(err)


def test_config_loads_from_an_fsspec_url():
    storage.write_bytes_atomic("memory://repa-test-config/run.yaml", b"train: {max_steps: 123}\n")
    assert load_config("memory://repa-test-config/run.yaml").train.max_steps == 123


def test_unknown_source_lists_presets_and_suggests_the_closest():
    err = _error("sit-xl-2-rep")
    assert "sit-xl-2-repa" in str(err) and "toy-cpu" in str(err)


# ---------------------------------------------------------------------------- round trip


def test_yaml_round_trip_is_lossless():
    cfg = load_config(
        "toy-cpu",
        ["train.lr=3e-4", "sample.output_url=s3://b/samples", "data.storage_options={anon: true}"],
    )
    text = cfg.to_yaml()
    again = RunConfig.from_yaml(text)
    assert again == cfg
    assert again.to_yaml() == text
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_to_yaml_lists_every_section_and_field():
    tree = yaml.safe_load(RunConfig().to_yaml())
    assert list(tree) == list(SECTIONS)
    for name, cls in SECTIONS.items():
        assert list(tree[name]) == [f.name for f in dataclasses.fields(cls)]


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == RunConfig()
    path.write_text("train:\nmodel: {}\n")
    assert load_config(path) == RunConfig()


# ---------------------------------------------------------------------------- overrides and coercion


def test_set_overrides_nested_keys_lists_bools_and_numbers():
    cfg = load_config(
        None,
        [
            "train.max_steps=4e+06",  # Helm renders 4000000 like this; PyYAML reads it as a string
            "train.lr=2e-4",
            "model.qk_norm=true",
            "model.name=SiT-B/2",
            "model.encoder_depth=4",
            "encoder.names=[dinov2-vit-s, dinov2-vit-b]",
            "encoder.weights_urls=[null, s3://w/dinov2_vitb14.pth]",
            "data.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9000",
            "storage.run_url=s3://bucket/runs/b2",
            "train.device=cuda:0",
            "sample.vae_name=sd-vae-ft-ema",
        ],
    )
    assert cfg.train.max_steps == 4_000_000 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == 2e-4 and type(cfg.train.lr) is float
    assert cfg.model.qk_norm is True and cfg.model.name == "SiT-B/2"
    assert cfg.encoder.names == ["dinov2-vit-s", "dinov2-vit-b"]
    assert cfg.encoder.weights_urls == [None, "s3://w/dinov2_vitb14.pth"]
    assert cfg.data.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert (cfg.storage.run_url, cfg.train.device, cfg.sample.vae_name) == (
        "s3://bucket/runs/b2",
        "cuda:0",
        "sd-vae-ft-ema",
    )


def test_overrides_apply_in_order_and_null_clears():
    cfg = load_config(
        None, ["train.lr=1e-3", "train.lr=5e-4", "storage.run_url=s3://x", "storage.run_url=null"]
    )
    assert cfg.train.lr == 5e-4 and cfg.storage.run_url is None
    assert load_config(None, ["encoder.names=[]"]).encoder.names == []


def test_string_fields_keep_the_text_the_user_typed():
    tree = apply_overrides({}, ["model.name=123", "train.device=cpu", "data.url=on"])
    assert tree == {"model": {"name": "123"}, "train": {"device": "cpu"}, "data": {"url": "on"}}


def test_yaml_int_fields_accept_integral_floats_and_reject_fractions(tmp_path):
    path = tmp_path / "helm.yaml"
    path.write_text(
        "train:\n  max_steps: 4e+06\n  global_batch_size: 256.0\ncheckpoint: {every_steps: 5.0e+03}\n"
    )
    cfg = load_config(path)
    assert (cfg.train.max_steps, cfg.train.global_batch_size, cfg.checkpoint.every_steps) == (
        4_000_000,
        256,
        5000,
    )
    err = _error(None, ["train.max_steps=1.5"])
    assert err.key == "train.max_steps" and "an int" in str(err) and "1.5" in str(err)


def test_unknown_key_is_named_with_the_closest_suggestion(tmp_path):
    err = _error(None, ["train.lrr=1e-4"])
    assert err.key == "train.lrr" and "did you mean train.lr?" in str(err)
    err = _error(None, ["train.encoder_depth=4"])  # right name, wrong section
    assert err.key == "train.encoder_depth" and "model.encoder_depth" in str(err)
    path = tmp_path / "typo.yaml"
    path.write_text("modle:\n  name: SiT-B/2\n")
    err = _error(path)
    assert err.key == "modle" and "did you mean model?" in str(err)
    path.write_text("checkpoint:\n  keep_last: 2\n")
    err = _error(path)
    assert err.key == "checkpoint.keep_last" and "checkpoint.keep_latest" in str(err)


def test_bad_literal_lists_the_allowed_values():
    err = _error(None, ["train.precision=fp8"])
    assert err.key == "train.precision"
    assert all(v in str(err) for v in ("'fp8'", "auto", "fp32", "bf16", "fp16"))
    err = _error(None, ["eval.metrics=[fid, kid]"])
    assert err.key == "eval.metrics[1]" and "precision_recall" in str(err)
    err = _error(None, ["sample.vae_name=sd-vae"])
    assert err.key == "sample.vae_name" and "sd-vae-ft-ema" in str(err)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("train: {lr: fast}", "train.lr", "a float"),
        ("model: {qk_norm: 3}", "model.qk_norm", "a bool"),
        ("model: {name: 12}", "model.name", "a string"),
        ("encoder: {names: dinov2-vit-b}", "encoder.names", "a list of a string"),
        ("encoder: {names: [dinov2-vit-b, 7]}", "encoder.names[1]", "a string"),
        ("data: {storage_options: [1]}", "data.storage_options", "a mapping"),
        ("train: 5", "train", "a mapping"),
        ("train: {max_steps: true}", "train.max_steps", "an int"),
        ("train: {lr: .inf}", "train.lr", "a float"),
    ],
)
def test_wrong_type_names_the_dotted_key_expected_type_and_value(tmp_path, text, key, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    err = _error(path)
    assert err.key == key
    assert str(err).startswith(f"{key}: ") and expected in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-4", "train.lr"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("train.adam_beta2=1", "train.adam_beta2"),
        ("train.max_steps=0", "train.max_steps"),
        ("model.class_dropout_prob=1.0", "model.class_dropout_prob"),
        ("objective.proj_coeff=-0.5", "objective.proj_coeff"),
        ("sample.guidance_high=1.5", "sample.guidance_high"),
        ("sample.guidance_low=0.8", "sample.guidance_low"),  # > guidance_high 0.7
        ("sample.cfg_scale=0.5", "sample.cfg_scale"),
        ("data.num_workers=-1", "data.num_workers"),
        ("eval.metrics=[]", "eval.metrics"),
        ("eval.metrics=[fid, fid]", "eval.metrics"),
        ("train.device=gpu", "train.device"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_key(override, key):
    assert _error(None, [override]).key == key


@pytest.mark.parametrize(
    ("source", "overrides", "key", "fragment"),
    [
        (None, ["model.encoder_depth=29"], "model.encoder_depth", "[1, 28]"),
        ("sit-b-2-repa", ["model.encoder_depth=13"], "model.encoder_depth", "[1, 12]"),
        (None, ["model.encoder_depth=0"], "model.encoder_depth", "[1, 28]"),  # REPA needs a tap block
        ("toy-cpu", ["model.num_heads=3"], "model.num_heads", "64"),
        (None, ["model.name=SiT-XXL/2"], "model.name", "SiT-XL/2"),
        (None, ["encoder.weights_urls=[a.pth, b.pth]"], "encoder.weights_urls", "has 2 entries"),
        (None, ["encoder.names=[dinov2-vit-bb]"], "encoder.names[0]", "dinov2-vit-b"),
        ("toy-cpu", ["encoder.names=[dinov2-vit-b]", "encoder.model_kwargs=[]"], "encoder.names[0]", "256"),
        (None, ["checkpoint.keep_every_steps=12345"], "checkpoint.keep_every_steps", "multiple"),
        (None, ["log.every_steps=300"], "checkpoint.every_steps", "log.every_steps"),
        (None, ["train.batch_size_per_device=48"], "train.batch_size_per_device", "256"),
        (None, ["data.resolution=260"], "data.resolution", "divisible"),
        ("toy-cpu", ["data.resolution=33"], "data.resolution", "patch"),
        (None, ["train.precision=fp16", "train.device=cpu"], "train.precision", "CPU"),
        ("toy-cpu", ["sample.vae_name=sd-vae-ft-ema"], "sample.vae_name", "latent"),
    ],
)
def test_cross_field_rules(source, overrides, key, fragment):
    err = _error(source, overrides)
    assert err.key == key and fragment in str(err)


def test_vanilla_sit_may_have_no_tap_block():
    cfg = load_config("sit-xl-2-vanilla", ["model.encoder_depth=0"])
    assert cfg.encoder.names == [] and cfg.model.encoder_depth == 0


def test_override_syntax_errors_say_what_is_expected():
    for item in ("train.lr", "=3", "train=3", "train..lr=1"):
        assert "SECTION.KEY=VALUE" in str(_error(None, [item]))
    err = _error(None, ["train.lr.x=1"])
    assert err.key == "train.lr.x" and "not a mapping" in str(err)
    err = _error(None, ["train.lr=[1"])
    assert err.key == "train.lr" and "YAML" in str(err)


def test_invalid_or_non_mapping_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    assert "invalid YAML" in str(_error(path))
    path.write_text("- a\n- b\n")
    assert "mapping" in str(_error(path))


def test_sections_built_in_code_are_coerced_and_checked():
    assert RunConfig(train={"lr": "1e-4", "max_steps": 1e3}).train.max_steps == 1000
    assert TrainConfig(max_steps=4e6).max_steps == 4_000_000
    with pytest.raises(ConfigError, match=r"^train\.lr: "):
        TrainConfig(lr=0)
    with pytest.raises(TypeError):
        TrainConfig(256)  # kw_only: no positional fields


def test_batch_plan_splits_the_global_batch_and_accumulates():
    assert TrainConfig().batch_plan(8) == (32, 1)
    assert TrainConfig(batch_size_per_device=16).batch_plan(8) == (16, 2)
    assert TrainConfig(batch_size_per_device=8).batch_plan(1) == (8, 32)
    with pytest.raises(ConfigError, match="world size 3"):
        TrainConfig().batch_plan(3)
    with pytest.raises(ConfigError, match=r"train\.batch_size_per_device.*256 / 16 = 16"):
        TrainConfig(batch_size_per_device=32).batch_plan(16)


def test_require_names_the_missing_key():
    cfg = load_config(None)
    with pytest.raises(ConfigError) as info:
        cfg.require_for("train")
    assert info.value.key == "data.url" and "--set data.url=" in str(info.value)
    cfg = load_config(None, ["data.url=s3://d", "storage.run_url=s3://r", "model.allow_random_weights=true"])
    assert cfg.require_for("train") is cfg


def test_config_error_is_a_one_line_value_error():
    err = ConfigError("train.lr", "must be\n  positive")
    assert isinstance(err, ValueError) and str(err) == "train.lr: must be positive" and err.key == "train.lr"
    assert str(ConfigError("data.url: required")) == "data.url: required"


# ---------------------------------------------------------------------------- docs and schema


def test_every_field_has_a_docstring():
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{name}: fields without a docstring: {missing}"


def test_json_schema_accepts_the_defaults_and_rejects_bad_values():
    schema = json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors(RunConfig().to_dict()))
    assert not list(validator.iter_errors({"train": {"max_steps": 4e6}}))  # integral float, as Helm renders
    for bad in (
        {"train": {"precision": "fp8"}},
        {"train": {"lrr": 1}},
        {"trainer": {}},
        {"train": {"lr": 0}},
        {"train": {"max_steps": 1.5}},
        {"sample": {"guidance_high": 2}},
        {"encoder": {"weights_urls": [None, 3]}},
    ):
        assert list(validator.iter_errors(bad)), bad


def test_json_schema_describes_every_field_with_type_default_and_description():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == ["preset", *SECTIONS]
    assert schema["properties"]["preset"]["enum"] == list_presets()
    for name, cls in SECTIONS.items():
        section = schema["properties"][name]
        assert section["additionalProperties"] is False
        for f in dataclasses.fields(cls):
            prop = section["properties"][f.name]
            assert "default" in prop and prop["description"]
            assert "type" in prop or "anyOf" in prop
    assert schema["properties"]["train"]["properties"]["precision"]["enum"] == [
        "auto",
        "fp32",
        "bf16",
        "fp16",
    ]
    assert schema["properties"]["sample"]["properties"]["vae_name"]["type"] == ["string", "null"]
    assert schema["properties"]["train"]["properties"]["lr"]["exclusiveMinimum"] == 0


def test_checked_in_configuration_docs_match_the_code():
    checked_in = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert checked_in == markdown_docs(), (
        "docs/configuration.md is stale: run `repa config docs -o docs/configuration.md`"
    )


def test_docs_list_every_field_and_preset():
    text = markdown_docs()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"| `{name}.{f.name}` |" in text
    for preset in list_presets():
        assert f"| `{preset}` |" in text
