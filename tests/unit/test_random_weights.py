"""Random weights only on purpose (issue 20): a config of published networks (every preset but the toy one,
any encoder at its full size, an SD-VAE) refuses `repa train`, `sample`, `eval`, `watch` and
`repa config validate --for` while a weights URL the verb needs is null, one line per missing key naming
the `repa weights fetch` command that fills it (exit 2, before torch is imported); the named choice
``model.allow_random_weights: true`` lets it run and is recorded in the checkpoint; toy runs need nothing."""

from __future__ import annotations

import pytest

from repa.cli import main
from repa.config import MissingWeightsError, list_presets, load_config

PUBLISHED = [p for p in list_presets() if not p.startswith("toy")]
# What each verb needs besides weights, so that the weights are the only thing missing.
REQUIRED = ["data.url=file:///d", "storage.run_url=file:///r", "eval.reference_stats_url=/ref.npz"]
NEEDS = {
    "train": {"encoder.weights_urls[0]", "vae.weights_url"},
    "sample": {"sample.vae_weights_url"},
    "eval": {"sample.vae_weights_url", "eval.inception_weights_url"},
    "watch": {"sample.vae_weights_url", "eval.inception_weights_url"},
}


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _missing_keys(stderr: str, preset: str) -> set[str]:
    """The keys named by the per-key lines, checking each names the fetch command."""
    lines = stderr.strip().splitlines()
    assert "RANDOM weights" in lines[0] and "model.allow_random_weights=true" in lines[0]
    keys = set()
    for line in lines[1:]:
        assert f"repa weights fetch --config {preset} --only " in line, line
        keys.add(line.split()[0])
    return keys


@pytest.mark.parametrize("verb", sorted(NEEDS))
@pytest.mark.parametrize("preset", PUBLISHED)
def test_published_presets_refuse_random_weights(preset, verb, capsys):
    needs = NEEDS[verb] - ({"encoder.weights_urls[0]"} if preset.endswith("vanilla") else set())
    # `repa config validate --for VERB`
    assert main(["config", "validate", "--config", preset, "--for", verb, *_sets(*REQUIRED)]) == 2
    assert _missing_keys(capsys.readouterr().err, preset) == needs
    # the verb itself, before its module (and torch) is imported
    assert main([verb, "--config", preset, *_sets(*REQUIRED)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"repa {verb}: config error: ")
    assert _missing_keys(err, preset) == needs


def test_each_filled_key_drops_out_and_the_named_choice_allows_random():
    cfg = load_config("sit-b-2-repa", REQUIRED)
    assert [k for k, _ in cfg.missing_weights("train")] == ["encoder.weights_urls[0]", "vae.weights_url"]
    filled = load_config(
        "sit-b-2-repa", [*REQUIRED, "encoder.weights_urls=[/w/dino.pt]", "vae.weights_url=/w/mse"]
    )
    assert filled.require_for("train") is filled
    decoded = load_config(
        "sit-b-2-repa", [*REQUIRED, "vae.weights_url=/w/mse", "sample.vae_weights_url=/w/ema"]
    )
    with pytest.raises(MissingWeightsError) as e:
        decoded.require_for("eval", "sit-b-2-repa")
    assert e.value.key == "eval.inception_weights_url" and len(str(e.value).splitlines()) == 2
    named = load_config("sit-b-2-repa", [*REQUIRED, "model.allow_random_weights=true"])
    for verb in NEEDS:
        assert named.require_for(verb) is named
    # a registry encoder shrunk by encoder.model_kwargs is a toy, not the published network
    toy_encoder = load_config(
        None, [*REQUIRED, "vae.name=none", "encoder.model_kwargs=[{embed_dim: 32, depth: 1}]"]
    )
    assert toy_encoder.published_networks() == [] and toy_encoder.missing_weights("eval") == []


def test_toy_preset_needs_no_weights(capsys):
    for verb in NEEDS:
        assert main(["config", "validate", "--config", "toy-cpu", "--for", verb, *_sets(*REQUIRED)]) == 0
    assert "RANDOM" not in capsys.readouterr().err


def test_named_random_choice_trains_and_is_recorded_in_the_checkpoint(tmp_path):
    from repa import checkpoint as ckpt
    from repa.data.prepare import prepare_images, prepare_latents
    from tests.support.datasets import make_imagenet_tree
    from tests.support.tiny_runs import TINY_TRAIN_SETS

    tree = make_imagenet_tree(tmp_path / "images", per_class=4, corrupt=0)
    data_url, run_url = f"file://{tmp_path}/shards", f"file://{tmp_path}/run"
    prepare_images(str(tree.root), data_url, resolution=16, samples_per_shard=8)
    prepare_latents(data_url, vae="none", batch_size=8)
    sets = [
        *TINY_TRAIN_SETS,
        "train.max_steps=1",
        "log.every_steps=1",
        "log.sample_every_steps=1000",
        "checkpoint.every_steps=1",
        "model.allow_random_weights=true",
        f"data.url={data_url}",
        f"storage.run_url={run_url}",
    ]
    assert main(["train", "--config", "toy-cpu", *_sets(*sets)]) == 0
    state = ckpt.load_checkpoint_state(ckpt.latest_checkpoint(run_url))
    assert state["config"]["model"]["allow_random_weights"] is True


@pytest.mark.usefixtures("one_thread")
def test_named_random_choice_is_recorded_in_the_eval_result_json(tmp_path, feats, reference):
    import json
    from pathlib import Path

    import yaml

    from repa.config import RunConfig
    from tests.support.tiny_features import FEATS
    from tests.support.tiny_runs import commit_tiny_checkpoint, tiny_run_config

    run_url = str(tmp_path / "run")
    tree = tiny_run_config(
        run_url,
        model={"allow_random_weights": True},
        sample={"num_samples": 6, "num_steps": 2, "batch_size_per_device": 6},
        eval={"reference_stats_url": reference},
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    commit_tiny_checkpoint(RunConfig.from_dict(tree), 10)
    argv = ["eval", "--config", str(tmp_path / "cfg.yaml"), "--feature-extractor", FEATS, "--no-progress"]
    assert main(argv) == 0
    (result,) = Path(run_url, "eval", "step-0000010").glob("result-*.json")
    assert json.loads(result.read_text())["protocol"]["allow_random_weights"] is True
