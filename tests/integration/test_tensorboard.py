"""What a run shows in TensorBoard, read back from its event files: a tiny `repa train`, then
`repa eval` of two checkpoints with random Inception weights.

- the training run: custom-scalars layout (loss and FID side by side), ``progress/step_of_max`` and
  ``progress/eta_hours``, and the same progress and ETA in the trainer's log line;
- the eval sub-run: HParams (experiment + session with the run's key config values and the
  evaluations' provenance (its protocol fields, equal to the result JSON's) -> its FIDs),
  ``eval/samples`` (the grid of the samples each evaluation scored) at each checkpoint's step, FIDs
  under ``*_unpublished_inception`` tags (never ``eval/fid``), the best FID so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.cli import main as repa_main
from repa.data.prepare import prepare_images, prepare_latents
from repa.eval.features import build_inception
from repa.eval.provenance import PROTOCOL_FIELDS
from repa.eval.refstats import compute_reference_stats, save_reference_stats
from repa.tensorboard import HPARAM_KEYS, read_scalars
from tests.support.datasets import make_imagenet_tree
from tests.support.fidelity_weights import random_inception_weights_path
from tests.support.tiny_runs import TINY_TRAIN_SETS

pytestmark = pytest.mark.usefixtures("one_thread")

SETS = [  # toy-cpu made smaller still (as tests/integration/test_train.py): 16 px, SiT hidden 32 x depth 2
    *TINY_TRAIN_SETS,
    "train.max_steps=4",
    "log.every_steps=2",
    "log.sample_every_steps=0",
    "checkpoint.every_steps=2",
    "sample.num_samples=8",
    "sample.chunk_size=8",
    "sample.num_steps=2",
    "eval.metrics=[fid]",
]


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb-run")
    tree = make_imagenet_tree(root / "imagenet", per_class=2, corrupt=0)
    data_url = f"file://{root}/shards"
    prepare_images(str(tree.root), data_url, resolution=16, samples_per_shard=4)
    prepare_latents(data_url, vae="none", batch_size=8)
    weights = random_inception_weights_path()
    ref = root / "ref.npz"
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8))
    save_reference_stats(str(ref), compute_reference_stats(images, build_inception(weights)))
    run_url = f"{root}/run"
    sets = [
        *SETS,
        f"data.url={data_url}",
        f"storage.run_url={run_url}",
        f"eval.inception_weights_url={weights}",
    ]
    sets.append(f"eval.reference_stats_url={ref}")
    args = [a for s in sets for a in ("--set", s)]
    return Path(run_url), args


def test_training_run_writes_layout_hparams_and_progress(run, caplog):
    run_dir, args = run
    with caplog.at_level(logging.INFO, logger="repa.train"):
        assert repa_main(["train", "--config", "toy-cpu", *args]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step")]
    assert "step        2 of 4  50.0% | ETA 0h00m" in lines[0] and "step        4 of 4 100.0%" in lines[-1]

    scalars = read_scalars(str(run_dir / "tensorboard"))
    assert scalars["progress/step_of_max"] == [(2, 0.5), (4, 1.0)]
    eta = scalars["progress/eta_hours"]
    assert [s for s, _ in eta] == [2, 4] and eta[0][1] > 0 and eta[-1][1] == 0

    acc = _events(run_dir / "tensorboard")
    from tensorboard.plugins.custom_scalar import layout_pb2

    assert list(acc.PluginTagToContent("custom_scalars")) == ["custom_scalars__config__"]
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    first = layout.category[0]
    assert first.title == "repa: is it working?"
    loss, fid = (chart.multiline.tag[0] for chart in first.chart)  # side by side, loss first
    assert "train/" in loss and "loss" in loss and "eval/" in fid and "fid" in fid

    with pytest.raises(KeyError):  # the HParams session lives in the eval sub-run, beside the FIDs
        acc.PluginTagToContent("hparams")


def _train_and_evaluate(run_dir: Path, args: list[str]) -> None:
    """`repa eval` of the checkpoints at steps 2 and 4 (training first if no test did; an evaluation
    already done is found and left as it is)."""
    if not (run_dir / "checkpoints").exists():
        assert repa_main(["train", "--config", "toy-cpu", *args]) == 0
    for step in (2, 4):
        checkpoint = str(run_dir / "checkpoints" / f"step-{step:07d}")
        assert (
            repa_main(["eval", "--config", "toy-cpu", *args, "--checkpoint", checkpoint, "--no-progress"])
            == 0
        )


def test_each_evaluation_logs_its_sample_grid_and_a_random_inception_fid(run):
    run_dir, args = run
    _train_and_evaluate(run_dir, args)

    scalars = read_scalars(str(run_dir / "tensorboard" / "eval"))
    assert "eval/fid" not in scalars  # random weights are never logged as the FID
    fids = dict(scalars["eval/fd_unpublished_inception"])
    assert sorted(fids) == [2, 4]
    best = dict(scalars["eval/best_fd_unpublished_inception"])
    assert best[2] == pytest.approx(fids[2]) and best[4] == pytest.approx(min(fids.values()))

    acc = _events(run_dir / "tensorboard" / "eval")
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hp = {tag: HParamsPluginData.FromString(c) for tag, c in acc.PluginTagToContent("hparams").items()}
    session = hp["_hparams_/session_start_info"].session_start_info.hparams
    assert {key for key in session if not key.startswith("provenance/")} == set(HPARAM_KEYS)
    assert session["model.name"].string_value == "SiT-S/2" and session["train.max_steps"].number_value == 4
    assert session["encoder.names"].string_value == "timm:vit_tiny_patch16_224"
    metrics = {m.name.tag for m in hp["_hparams_/experiment"].experiment.metric_infos}
    assert {"eval/fid", "eval/best_fid", "eval/best_fd_unpublished_inception"} <= metrics

    grids = acc.Images("eval/samples")
    assert [g.step for g in grids] == [2, 4]
    # 8 samples of 16 px, 3 per row with 2 px padding: 3 columns x 3 rows
    assert (grids[0].width, grids[0].height) == (3 * 18 + 2, 3 * 18 + 2)


def test_the_hparams_session_shows_how_the_scores_were_made(run):
    """The protocol fields of the result JSON's provenance, as HParams values under ``provenance/``."""
    run_dir, args = run
    _train_and_evaluate(run_dir, args)
    # the run's first evaluation (step 2): TensorBoard keeps the first session record of a run
    (result_file,) = (run_dir / "eval" / "step-0000002").glob("result-*.json")
    record = json.loads(result_file.read_text())["provenance"]

    acc = _events(run_dir / "tensorboard" / "eval")
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hp = {tag: HParamsPluginData.FromString(c) for tag, c in acc.PluginTagToContent("hparams").items()}
    session = hp["_hparams_/session_start_info"].session_start_info.hparams
    shown = {key: getattr(v, v.WhichOneof("kind")) for key, v in session.items()}
    assert {key for key in shown if key.startswith("provenance/")} == {
        f"provenance/{field}" for field in PROTOCOL_FIELDS if field in record
    }
    assert len(PROTOCOL_FIELDS) >= 19 and "provenance/checkpoint.url" not in shown  # protocol only
    for field in ("sampler.name", "sampler.num_steps", "sampler.nfe", "guidance.scale", "precision"):
        assert shown[f"provenance/{field}"] == record[field], field
    assert shown["provenance/sampler.num_steps"] == 2 and shown["provenance/samples.count"] == 8
    assert shown["provenance/tf32"] is record["tf32"]  # a bool stays a bool (torch's writer makes it 1.0)
    assert shown["provenance/vae.name"] == record["vae.name"]
    assert shown["provenance/uint8_conversion"] == record["uint8_conversion"]
    assert shown["provenance/samples.seed"] == record["samples.seed"]
    low, high = record["guidance.interval"]
    assert shown["provenance/guidance.interval"] == f"[{low:g}, {high:g}]"
    assert shown["provenance/samples.index_range"] == "[0, 8]"
    assert shown["provenance/reference.url"] == record["reference.url"]
    assert shown["provenance/reference.sha256"] == record["reference.sha256"][:12]
    assert shown["provenance/reference.count"] == record["reference.count"] == 8
    (extractor,) = record["extractors"]
    assert (
        shown["provenance/extractors"] == f"[{extractor['name']} (sha256 {extractor['weights_sha256'][:12]})]"
    )
    types = {info.name: info.type for info in hp["_hparams_/experiment"].experiment.hparam_infos}
    assert set(types) == set(shown)  # the experiment declares every column the session fills
