"""An evaluation's provenance as HParams values (repa.tensorboard.provenance_hparams): every protocol
field the record holds, under ``provenance/``, as a str, number or bool; fields a record lacks (an older
result) are skipped, and fields added later (another feature network's) render like the rest."""

from __future__ import annotations

from repa.eval.provenance import PROTOCOL_FIELDS
from repa.tensorboard import HPARAM_KEYS, provenance_hparams
from tests.unit.test_eval_compare import result


def test_every_protocol_field_is_a_short_hparams_value():
    record = result()["provenance"]
    values = provenance_hparams(record, PROTOCOL_FIELDS)
    assert list(values) == [f"provenance/{field}" for field in PROTOCOL_FIELDS]
    assert not set(values) & set(HPARAM_KEYS)
    assert all(isinstance(v, (str, int, float, bool)) for v in values.values())
    assert values["provenance/sampler.name"] == "sde" and values["provenance/sampler.nfe"] == 250
    assert values["provenance/guidance.scale"] == 1.8 and values["provenance/tf32"] is True
    assert values["provenance/guidance.interval"] == "[0, 0.7]"
    assert values["provenance/vae.weights_sha256"] == "b" * 12
    assert values["provenance/reference.sha256"] == "c" * 12
    assert values["provenance/extractors"] == "[inception-v3-compat (sha256 6726825d0000)]"
    assert values["provenance/labels.distribution"] == (
        "class_balanced=False, num_classes=1000, classes_present=1000"
    )


def test_missing_fields_are_skipped_and_new_ones_render():
    record = {
        "sampler.name": "ode_heun",
        "vae.weights_sha256": None,  # a weightless VAE
        "dinov2.weights_sha256": "d" * 64,
        "dinov2.resize": {"mode": "bicubic", "size": 224},
        "extractors": [
            {"name": "custom", "weights_sha256": None},
            {"name": "dinov2-vitl14", "weights_sha256": "e" * 64},
        ],
    }
    fields = (
        "sampler.name",
        "sampler.nfe",
        "vae.weights_sha256",
        "dinov2.weights_sha256",
        "dinov2.resize",
        "extractors",
    )
    assert provenance_hparams(record, fields) == {
        "provenance/sampler.name": "ode_heun",
        "provenance/vae.weights_sha256": "null",
        "provenance/dinov2.weights_sha256": "d" * 12,
        "provenance/dinov2.resize": "mode=bicubic, size=224",
        "provenance/extractors": f"[custom (sha256 null), dinov2-vitl14 (sha256 {'e' * 12})]",
    }


def test_tensorboard_shows_the_first_evaluations_session(tmp_path):
    """What docs/tensorboard.md says: of two evaluations' sessions in one run, the first is shown."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from repa.config import load_config
    from repa.eval.report import write_tensorboard

    cfg = load_config("toy-cpu")
    run = cfg.storage.locate(str(tmp_path / "run"))
    for step, sampler in ((2, "sde"), (4, "ode_heun")):
        write_tensorboard(run, step, {"eval/fid": float(step)}, cfg=cfg, provenance={"sampler.name": sampler})
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "eval"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = HParamsPluginData.FromString(content).session_start_info.hparams
    assert session["provenance/sampler.name"].string_value == "sde"
    assert len(list((tmp_path / "run" / "tensorboard" / "eval").glob("events.out.tfevents.*"))) == 2
