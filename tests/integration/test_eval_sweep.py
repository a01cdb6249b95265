"""`repa eval sweep` and `repa eval-job --sweep` on a tiny checkpoint (repa.eval.sweep).

A 2x2 grid (CFG scale x guidance-interval end) writes the table, the heat map and the best cell; every
cell scores the same labels and noises; the Indexed Job (2 indices, run here one after the other with
JOB_COMPLETION_INDEX set, as Kubernetes would run its pods) writes the same summary bytes as one
process; an index killed mid-cell loses nothing (its finished chunks are reused on the rerun).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from repa import checkpoint as ckpt
from repa.config import RunConfig
from repa.eval import sample as S
from repa.eval import sweep
from repa.eval.sample_set import SamplingInterrupted
from repa.tensorboard import read_scalars
from tests.support.tiny_features import FEATS
from tests.support.tiny_runs import commit_tiny_checkpoint, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["--cfg-scale", "1.0,1.8", "--guidance-high", "0.7,1.0"]


def cli(*argv: str) -> int:
    from repa.cli import main

    return main(list(argv))


def setup_run(tmp_path: Path, reference: str) -> tuple[str, str, RunConfig]:
    run_url = str(tmp_path / "run")
    tree = tiny_run_config(
        run_url,
        sample={"num_samples": 8, "num_steps": 3, "batch_size_per_device": 4, "chunk_size": 4},
        eval={"reference_stats_url": reference, "feature_extractor": FEATS},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = RunConfig.from_dict(tree)
    commit_tiny_checkpoint(cfg, 100)
    return run_url, str(path), cfg


def eval_job_argv(tmp_path: Path, cfg_path: str, run_url: str, args: list[str]) -> tuple[list[str], str]:
    """`repa eval-job` of step 100 with a Job template whose container runs ``args``; and the step's URL."""
    template = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "myrun-eval", "namespace": "ml"},
        "spec": {"template": {"spec": {"containers": [{"name": "eval", "args": args}]}}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(template))
    step_url = f"{run_url}/checkpoints/step-0000100"
    argv = [
        "eval-job",
        "--config",
        cfg_path,
        "--checkpoint",
        step_url,
        "--job-template",
        str(tmp_path / "job.yaml"),
    ]
    return argv, step_url


def summary_files(run_url: str) -> dict[str, bytes]:
    (folder,) = Path(run_url, "eval", "step-0000100").glob("sweep-*")
    return {name: (folder / name).read_bytes() for name in sweep.SUMMARY_FILES}


def forget_results(run_url: str) -> None:
    shutil.rmtree(Path(run_url, "eval"))
    shutil.rmtree(Path(run_url, "samples"))


def test_a_2x2_sweep_writes_table_heatmap_and_best_cell_on_common_random_numbers(tmp_path, reference, capsys):
    run_url, cfg_path, _ = setup_run(tmp_path, reference)
    assert cli("eval", "sweep", "--config", cfg_path, *GRID, "--no-progress") == 0
    out = capsys.readouterr().out
    files = summary_files(run_url)
    summary = json.loads(files["sweep.json"])
    assert [(c["cfg_scale"], c["guidance_high"]) for c in summary["cells"]] == [
        (1.0, 0.7),
        (1.0, 1.0),
        (1.8, 0.7),
        (1.8, 1.0),
    ]
    best = min(summary["cells"], key=lambda c: c["fid"])
    assert summary["best"]["fid"] == {
        "cfg_scale": best["cfg_scale"],
        "guidance_high": best["guidance_high"],
        "value": best["fid"],
    }
    assert (
        f"best FD_tiny-conv (8 samples): {best['fid']:.4f}" in out
        and summary["score"] == "FD_tiny-conv (8 samples)"
    )
    assert "best precision (tiny-conv features): " in out and "best fid" not in out
    assert (
        files["heatmap.png"].startswith(b"\x89PNG")
        and "| w \\ high | 0.7 | 1 |" in files["sweep.md"].decode()
    )

    # Common random numbers: every cell drew the same labels (and the same z and SDE noise).
    results = [json.loads(Path(c["result"]).read_text()) for c in summary["cells"]]
    labels = [S.SampleSet.open(r["protocol"]["samples_url"]).labels() for r in results]
    assert all((lab == labels[0]).all() for lab in labels)
    specs = [S.SampleSpec(**r["protocol"]["sampling"]) for r in results]
    assert len({(s.cfg_scale, s.guidance_high) for s in specs}) == 4
    inputs = [S.sample_inputs(s, range(8), (4, 2, 2)) for s in specs]
    assert all(torch.equal(i.z, inputs[0].z) and torch.equal(i.noise, inputs[0].noise) for i in inputs)
    # ... and from the stored samples: at w = 1 no step is guided, so with the same noises the two w = 1
    # cells made the very same images whatever their interval; at w = 1.8 the interval matters
    images = [
        np.concatenate(list(S.SampleSet.open(r["protocol"]["samples_url"]).iter_images())) for r in results
    ]
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[2], images[3])
    from PIL import Image

    heatmap = Image.open(io.BytesIO(files["heatmap.png"]))
    assert heatmap.size[0] > 100 and len(heatmap.convert("RGB").getcolors(1 << 20)) > 2  # a drawn figure

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_url, "tensorboard", "eval")), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("eval/sweep")] == [100]
    # the cells' small-sample scores are the heat map's, never eval/fd_* points beside the full protocol
    assert acc.Tags()["scalars"] == [] and "eval/samples" not in acc.Tags()["images"]


def test_the_indexed_job_gives_the_same_files_and_a_killed_index_loses_nothing(
    tmp_path, reference, monkeypatch, capsys
):
    run_url, cfg_path, cfg = setup_run(tmp_path, reference)
    assert cli("eval", "sweep", "--config", cfg_path, *GRID, "--no-progress") == 0
    single = summary_files(run_url)
    forget_results(run_url)

    # The Job `repa eval-job --sweep` prints: one Indexed Job, 2 indices splitting the 4 cells.
    pod_args = ["eval", "--config", cfg_path, "--checkpoint", "$(REPA_CHECKPOINT_URL)"]
    argv, step_url = eval_job_argv(tmp_path, cfg_path, run_url, pod_args)
    capsys.readouterr()
    assert cli(*argv, "--sweep", *GRID, "--sweep-pods", "2") == 0
    job = yaml.safe_load(capsys.readouterr().out)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    (container,) = spec["template"]["spec"]["containers"]
    args = [a.replace("$(REPA_CHECKPOINT_URL)", step_url) for a in container["args"]]
    assert args[:2] == ["eval", "sweep"] and args[-2:] == ["--count", "2"] and "--no-progress" not in args
    assert (
        job["metadata"]["name"].startswith("myrun-eval-step-0000100") and "-sweep-" in job["metadata"]["name"]
    )

    # Index 1 killed mid-cell (after its first chunk), then retried by the Job: nothing redone.
    source = ckpt.resolve_checkpoint(step_url, None)
    grid = sweep.SweepGrid((1.0, 1.8), (0.7, 1.0))
    polls = iter([False, True])
    with pytest.raises(SamplingInterrupted):
        sweep.run_sweep(cfg, source, grid, index=1, count=2, progress=False, should_stop=lambda: next(polls))
    (kept,) = Path(run_url, "samples").glob("*/chunks/chunk-000000.npz")
    mtime = kept.stat().st_mtime_ns
    for index in ("1", "0"):  # the pods, in any order; the last one to finish writes the summary
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
        assert cli(*args, "--no-progress") == 0
    assert kept.stat().st_mtime_ns == mtime  # the killed index's finished chunk was reused
    assert summary_files(run_url) == single  # byte for byte


def test_cells_times_sample_ranges_over_three_indices_give_the_same_files(tmp_path, reference, monkeypatch):
    """--sample-parts 2: 4 cells x 2 sample parts = 8 units over 3 indices (unit u -> index u % 3). A
    cell is scored by whoever completes its last part; the summary is the single process's, byte for
    byte; every chunk is sampled once."""
    run_url, cfg_path, _ = setup_run(tmp_path, reference)
    assert cli("eval", "sweep", "--config", cfg_path, *GRID, "--no-progress") == 0
    single = summary_files(run_url)
    forget_results(run_url)

    args = [
        "eval",
        "sweep",
        "--config",
        cfg_path,
        *GRID,
        "--count",
        "3",
        "--sample-parts",
        "2",
        "--no-progress",
    ]
    results = lambda: sorted(Path(run_url, "eval", "step-0000100").glob("result-*.json"))  # noqa: E731
    chunks = lambda: sorted(Path(run_url, "samples").glob("*/chunks/chunk-*.npz"))  # noqa: E731
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert cli(*args) == 0
    # index 0: cell 0 part 0, cell 1 part 1, cell 3 part 0 -> one chunk of three cells, nothing scored
    assert [c.name for c in chunks()].count("chunk-000000.npz") == 2 and len(chunks()) == 3
    assert results() == []
    made = {c: c.stat().st_mtime_ns for c in chunks()}
    for index in ("1", "2"):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
        assert cli(*args) == 0
    assert len(results()) == 4 and len(chunks()) == 8
    assert all(c.stat().st_mtime_ns == t for c, t in made.items())  # index 0's chunks were not redone
    assert summary_files(run_url) == single  # byte for byte


def test_shared_cells_keep_their_samples_until_the_summary_then_delete_them(tmp_path, reference, monkeypatch):
    """--sample-parts with --delete-samples: a cell's chunks stay until the sweep's summary is written
    (another pod may still be reading them), then the summary's writer deletes them all."""
    run_url, cfg_path, _ = setup_run(tmp_path, reference)
    args = ["eval", "sweep", "--config", cfg_path, "--cfg-scale", "1.0,1.8", "--guidance-high", "0.7"]
    args += ["--count", "2", "--sample-parts", "2", "--delete-samples", "--no-progress"]
    chunks = lambda: list(Path(run_url, "samples").glob("*/chunks/chunk-*.npz"))  # noqa: E731
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert cli(*args) == 0
    assert len(chunks()) == 2  # index 0: part 0 of both cells
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert cli(*args) == 0  # completes and scores both cells, writes the summary, then deletes
    assert chunks() == [] and len(list(Path(run_url, "eval", "step-0000100").glob("result-*.json"))) == 2
    (summary,) = Path(run_url, "eval", "step-0000100").glob("sweep-*/sweep.json")
    assert len(json.loads(summary.read_text())["cells"]) == 2
    assert cli(*args) == 0  # a retried pod finds it all done


def test_the_sweep_job_splits_sample_ranges_when_asked(tmp_path, reference, capsys):
    grid = sweep.SweepGrid((1.0, 1.8), (0.7,))
    body = {
        "metadata": {"name": "r-eval"},
        "spec": {"template": {"spec": {"containers": [{"args": ["eval"]}]}}},
    }
    job = sweep.sweep_job(body, grid, 4, "0123456789ab", sample_parts=2)
    assert job["spec"]["completions"] == 4
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-4:] == [
        "--count",
        "4",
        "--sample-parts",
        "2",
    ]
    assert (
        "--sample-parts"
        not in sweep.sweep_job(body, grid, 2, "0123456789ab")["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )


def test_eval_job_sets_reach_the_pods_so_they_write_the_sweep_the_job_is_named_for(
    tmp_path, reference, monkeypatch, capsys
):
    """`repa eval-job --sweep --num-samples 4 --set ...`: the Job's name and label carry the digest of
    that protocol, and its pods run it (the overrides are in their command), so they write exactly the
    sweep folder the label names."""
    run_url, cfg_path, _ = setup_run(tmp_path, reference)
    argv, step_url = eval_job_argv(tmp_path, cfg_path, run_url, ["eval", "--config", cfg_path])
    capsys.readouterr()
    assert (
        cli(*argv, "--sweep", *GRID, "--sweep-pods", "2", "--num-samples", "4", "--set", "sample.seed=3") == 0
    )
    job = yaml.safe_load(capsys.readouterr().out)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = [a.replace("$(REPA_CHECKPOINT_URL)", step_url) for a in container["args"]]
    assert args[args.index("sample.seed=3") - 1 : args.index("sample.seed=3") + 1] == [
        "--set",
        "sample.seed=3",
    ]
    assert "sample.num_samples=4" in args
    for index in ("0", "1"):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
        assert cli(*args, "--checkpoint", step_url, "--no-progress") == 0
    (folder,) = Path(run_url, "eval", "step-0000100").glob("sweep-*")
    assert folder.name == f"sweep-{job['metadata']['labels']['repa.io/sweep']}"
    summary = json.loads((folder / "sweep.json").read_text())
    assert summary["score"] == "FD_tiny-conv (4 samples)"
    # the plain eval Job carries the overrides too
    assert cli(*argv, "--set", "sample.num_steps=5") == 0
    (container,) = yaml.safe_load(capsys.readouterr().out)["spec"]["template"]["spec"]["containers"]
    assert container["args"][-2:] == ["--set", "sample.num_steps=5"]


def test_sweep_flags_are_checked_in_one_line(tmp_path, reference, capsys):
    run_url, cfg_path, _ = setup_run(tmp_path, reference)
    # 8 samples in 2 chunks of 4: a third part would have nothing to do
    assert cli("eval", "sweep", "--config", cfg_path, *GRID, "--sample-parts", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sample-parts: 3 parts of a cell's 2 sample chunk(s)" in err[0]
    job, _ = eval_job_argv(tmp_path, cfg_path, run_url, ["eval"])
    for extra, named in (
        (["--sample-parts", "2"], "--sample-parts: splits a guidance sweep's cells: only with --sweep"),
        (["--sweep", "--sample-parts", "0"], "--sample-parts: 0: expected at least 1"),
    ):
        assert cli(*job, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
    assert cli("eval", "sweep", "--config", cfg_path, "--cfg-scale", "1.0,x", "--guidance-high", "0.7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cfg-scale" in err[0] and "comma-separated numbers" in err[0]
    assert not Path(run_url, "samples").exists()


def test_the_watcher_sweeps_every_nth_checkpoint_then_scores_its_best_cell(tmp_path, reference, capsys):
    run_url = str(tmp_path / "run")
    tree = tiny_run_config(
        run_url,
        sample={"num_samples": 8, "num_steps": 3, "batch_size_per_device": 4, "chunk_size": 4},
        checkpoint={"every_steps": 100},
        eval={
            "reference_stats_url": reference,
            "feature_extractor": FEATS,
            "sweep_every_nth": 2,
            "sweep_num_samples": 4,
            "sweep_cfg_scales": [1.0, 1.8],
            "sweep_guidance_highs": [0.7],
        },
    )
    cfg = RunConfig.from_dict(tree)
    for step in (100, 200):
        commit_tiny_checkpoint(cfg, step)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    argv = ("watch", "--config", str(path), "--once", "--no-progress")
    assert cli(*argv) == 0
    assert "2 checkpoint(s) handled [100, 200], 0 failed" in capsys.readouterr().out

    def full_results(step: int) -> list[dict]:
        files = Path(run_url, "eval", f"step-{step:07d}").glob("result-*.json")
        return [r for r in map(json.loads, map(Path.read_text, files)) if r["num_samples"] == 8]

    assert not list(Path(run_url, "eval", "step-0000100").glob("sweep-*"))  # index 1: not swept
    (plain,) = full_results(100)
    assert plain["provenance"]["guidance.scale"] == 1.8  # the configured scale
    (summary_file,) = Path(run_url, "eval", "step-0000200").glob("sweep-*/sweep.json")
    summary = json.loads(summary_file.read_text())
    assert summary["score"] == "FD_tiny-conv (4 samples)" and len(summary["cells"]) == 2
    (best,) = full_results(200)  # the full protocol, once, at the sweep's best cell
    assert best["provenance"]["guidance.scale"] == summary["best"]["fid"]["cfg_scale"]
    # TensorBoard: one point per full-protocol evaluation (the cells' scores are eval/sweep's), and the
    # best cell's in a run of its own: a curve never mixes guidance settings
    points = read_scalars(str(Path(run_url, "tensorboard", "eval")))["eval/fd_tiny-conv"]
    assert points == [(100, pytest.approx(plain["fid"]))]
    points = read_scalars(str(Path(run_url, "tensorboard", "eval_best_guidance")))["eval/fd_tiny-conv"]
    assert points == [(200, pytest.approx(best["fid"]))]

    assert cli(*argv) == 0  # a restarted watcher finds both done (the sweep's best cell included)
    assert "0 checkpoint(s) handled []" in capsys.readouterr().out
