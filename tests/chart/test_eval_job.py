"""`repa eval-job`: the Job for one checkpoint, for `kubectl apply -f -` (docs/kubernetes.md "Evaluation").

From the chart's own eval Job template and run config (rendered by helm): the output validates as a core
Job, is the same for the same checkpoint (so a second apply is a no-op), is the Job the watcher would create,
and its pod spec is the chart's eval Job pod spec with the checkpoint filled in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_helpers import KUBE_VERSIONS, NAMESPACE, eval_job_template, one, render

from repa.cli import main as repa_main
from repa.config import load_config
from repa.eval import jobs

RUN_URL = "s3://repa-ci/runs/minimal"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path, dict]:
    docs = render("minimal")
    folder = tmp_path_factory.mktemp("release")
    (folder / "config.yaml").write_text(one(docs, "ConfigMap", "config")["data"]["config.yaml"])
    (folder / "eval-job.yaml").write_text(one(docs, "ConfigMap", "eval")["data"]["eval-job.yaml"])
    return folder / "config.yaml", folder / "eval-job.yaml", eval_job_template(docs)


def eval_job(capsys, release, checkpoint: str) -> tuple[int, str, str]:
    config, template, _ = release
    code = repa_main(
        ["eval-job", "--config", str(config), "--job-template", str(template), "--checkpoint", checkpoint]
    )
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_job_prints_a_valid_job_named_after_run_step_and_protocol(capsys, release) -> None:
    code, out, _ = eval_job(capsys, release, f"{RUN_URL}/checkpoints/step-0400000")
    assert code == 0
    job = yaml.safe_load(out)
    kubernetes_validate.validate(job, KUBE_VERSIONS[-1], strict=True)
    name = job["metadata"]["name"]
    assert name.startswith("myrun-repa-eval-step-0400000-") and len(name) <= 63
    assert job["metadata"]["namespace"] == NAMESPACE and "generateName" not in job["metadata"]
    # idempotent: the same checkpoint gives the same manifest, byte for byte; another step another name
    assert eval_job(capsys, release, f"{RUN_URL}/checkpoints/step-0400000/")[1] == out
    other = yaml.safe_load(eval_job(capsys, release, f"{RUN_URL}/checkpoints/step-0410000")[1])
    assert other["metadata"]["name"].startswith("myrun-repa-eval-step-0410000-")


def test_eval_job_is_the_job_the_watcher_creates_with_the_chart_pod_spec(capsys, release) -> None:
    config, template_path, chart_template = release
    url = f"{RUN_URL}/checkpoints/step-0400000"
    job = yaml.safe_load(eval_job(capsys, release, url)[1])

    from repa import checkpoint as ckpt
    from repa.eval.evaluate import plan_evaluation

    cfg = load_config(config)
    plan = plan_evaluation(cfg, ckpt.CheckpointSource(url, "run", 400000, RUN_URL))
    created = []

    class Api:
        def create_namespaced_job(self, namespace: str, body: dict) -> None:
            created.append(body)

    jobs.JobLauncher(Api(), jobs.load_job_template(str(template_path))).launch(url, 400000, plan.digest)
    assert created == [job]

    def pod_spec(j: dict) -> dict:
        spec = copy.deepcopy(j["spec"]["template"]["spec"])
        for c in spec["containers"]:
            c["env"] = [e for e in c["env"] if not e["name"].startswith("REPA_CHECKPOINT_")]
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
