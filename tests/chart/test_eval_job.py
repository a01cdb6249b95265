"""`repa eval-job`: the Job for one checkpoint, for `kubectl apply -f -` (docs/kubernetes.md "Evaluation").

From the chart's own eval Job template and run config (rendered by helm): the output validates as a core
Job, is the same for the same checkpoint (so a second apply is a no-op), is the Job the watcher would create,
and its pod spec is the chart's eval Job pod spec with the checkpoint filled in. A checkpoint the watcher
would not evaluate (missing, not committed, quarantined) gets no Job: one line, exit code 3.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_helpers import KUBE_VERSIONS, NAMESPACE, eval_job_template, one, render

from repa import checkpoint as ckpt
from repa.cli import main as repa_main
from repa.cluster import jobs
from repa.config import load_config

STEPS = (400000, 410000)  # committed steps of the fixture's run


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path, dict, str]:
    """The chart's run config and eval Job template, and a run (a local folder) with committed steps."""
    docs = render("minimal")
    folder = tmp_path_factory.mktemp("release")
    (folder / "config.yaml").write_text(one(docs, "ConfigMap", "config")["data"]["config.yaml"])
    (folder / "eval-job.yaml").write_text(one(docs, "ConfigMap", "eval")["data"]["eval-job.yaml"])
    run_url = str(folder / "run")
    for step in STEPS:
        step_dir = folder / "run" / "checkpoints" / ckpt.step_dir_name(step)
        step_dir.mkdir(parents=True)
        (step_dir / ckpt.MARKER).write_text("{}")
    return folder / "config.yaml", folder / "eval-job.yaml", eval_job_template(docs), run_url


def eval_job(capsys, release, checkpoint: str) -> tuple[int, str, str]:
    config, template, _, run_url = release
    code = repa_main(
        [
            "eval-job",
            "--config",
            str(config),
            "--set",
            f"storage.run_url={run_url}",
            "--job-template",
            str(template),
            "--checkpoint",
            checkpoint,
        ]
    )
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_job_prints_a_valid_job_named_after_run_step_and_protocol(capsys, release) -> None:
    run_url = release[3]
    code, out, _ = eval_job(capsys, release, f"{run_url}/checkpoints/step-0400000")
    assert code == 0
    job = yaml.safe_load(out)
    kubernetes_validate.validate(job, KUBE_VERSIONS[-1], strict=True)
    name = job["metadata"]["name"]
    assert name.startswith("myrun-repa-eval-step-0400000-") and len(name) <= 63
    assert job["metadata"]["namespace"] == NAMESPACE and "generateName" not in job["metadata"]
    # idempotent: the same checkpoint gives the same manifest, byte for byte; another step another name
    assert eval_job(capsys, release, f"{run_url}/checkpoints/step-0400000/")[1] == out
    other = yaml.safe_load(eval_job(capsys, release, f"{run_url}/checkpoints/step-0410000")[1])
    assert other["metadata"]["name"].startswith("myrun-repa-eval-step-0410000-")


def test_eval_job_is_the_job_the_watcher_creates_with_the_chart_pod_spec(capsys, release) -> None:
    config, template_path, chart_template, run_url = release
    url = f"{run_url}/checkpoints/step-0400000"
    job = yaml.safe_load(eval_job(capsys, release, url)[1])

    from repa.eval.evaluate import plan_evaluation

    cfg = load_config(config, [f"storage.run_url={run_url}"])
    plan = plan_evaluation(cfg, ckpt.CheckpointSource(url, "run", 400000, run_url))
    created = []

    class Api:
        def create_namespaced_job(self, namespace: str, body: dict) -> None:
            created.append(body)

    # eval-job's own --set (here the test's local run folder) reaches the pod, as the watcher's config
    forwarded = ["--set", f"storage.run_url={run_url}"]
    jobs.JobLauncher(Api(), jobs.load_job_template(str(template_path))).launch(
        url, 400000, plan.digest, forwarded
    )
    assert created == [job]

    def pod_spec(j: dict) -> dict:
        spec = copy.deepcopy(j["spec"]["template"]["spec"])
        for c in spec["containers"]:
            c["env"] = [e for e in c["env"] if not e["name"].startswith("REPA_CHECKPOINT_")]
            if c["args"][-2:] == forwarded:
                c["args"] = c["args"][:-2]
        return spec

    assert pod_spec(job) == pod_spec(chart_template)
    env = {
        e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e
    }
    assert env["REPA_CHECKPOINT_URL"] == url and env["REPA_CHECKPOINT_STEP"] == "400000"
    assert job["spec"]["template"]["metadata"]["labels"]["repa.io/checkpoint-step"] == "400000"


def test_a_checkpoint_outside_the_run_is_one_line_naming_the_flag(capsys, release) -> None:
    code, out, err = eval_job(capsys, release, "s3://elsewhere/checkpoints/step-0400000")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--checkpoint" in err and "Traceback" not in err


def _watcher_would_evaluate(run_url: str, step: int) -> bool:
    """The watcher's own selection: the committed steps of its listing (repa.eval.watch.poll_once)."""
    committed, _ = ckpt.list_checkpoints(run_url)
    return step in [ref.step for ref in committed]


@pytest.mark.parametrize("case", ["missing", "uncommitted", "quarantined"])
def test_a_checkpoint_the_watcher_would_skip_gets_no_job_one_line_exit_3(capsys, release, case) -> None:
    run_url = release[3]
    step = {"missing": 420000, "uncommitted": 430000, "quarantined": 440000}[case]
    step_dir = Path(run_url) / "checkpoints" / ckpt.step_dir_name(step)
    if case != "missing":
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / "state.pt").write_bytes(b"half an upload")
    if case == "quarantined":
        (step_dir / ckpt.MARKER).write_text("{}")
        (step_dir / ckpt.QUARANTINE).write_text('{"reason": "sha256 of state.pt does not match"}')
    assert not _watcher_would_evaluate(run_url, step)
    code, out, err = eval_job(capsys, release, f"{run_url}/checkpoints/{ckpt.step_dir_name(step)}")
    assert (code, out) == (3, ""), err
    assert err.count("\n") == 1 and "Traceback" not in err and ckpt.step_dir_name(step) in err
    assert {"missing": "does not exist", "uncommitted": "not committed", "quarantined": "quarantined"}[
        case
    ] in err
    if case == "missing":
        assert f"latest committed is step {STEPS[-1]}" in err
    if case == "quarantined":
        assert "sha256 of state.pt does not match" in err
    # ... and the committed ones still get their Job, as the watcher would launch it
    assert all(_watcher_would_evaluate(run_url, s) for s in STEPS)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_watchers_sweep_job_and_best_cell_job_from_the_chart_template_are_valid(
    release, kube_version
) -> None:
    """`repa watch --launch-jobs` with eval.sweep_every_nth: the chart's eval Job template (the Role
    already allows jobs.batch) becomes ONE Indexed Job of the sweep, then the best cell's eval Job."""
    from repa.eval.watch import WatchSweep

    config, template_path, _, run_url = release
    cfg = load_config(config, [f"storage.run_url={run_url}", "eval.sweep_every_nth=1", "eval.sweep_pods=3"])
    url = f"{run_url}/checkpoints/step-0400000"
    source = ckpt.CheckpointSource(url, "run", 400000, run_url)
    launcher = jobs.JobLauncher(None, jobs.load_job_template(str(template_path)))
    sweep = WatchSweep(cfg).job(launcher, source, cfg.eval.sweep_pods)
    kubernetes_validate.validate(sweep, kube_version, strict=True)
    spec = sweep["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"][:2] == ["eval", "sweep"] and container["args"][-2:] == ["--count", "3"]
    assert container["args"][container["args"].index("--num-samples") + 1] == "1000"
    best = launcher.render(
        url, 400000, "d1ge57", ("--set", "sample.cfg_scale=1.8", "--set", "sample.guidance_high=0.7")
    )
    kubernetes_validate.validate(best, kube_version, strict=True)
    assert best["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "sample.guidance_high=0.7"
