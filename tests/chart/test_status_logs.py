"""`repa status` and `repa logs` against a fake Kubernetes API server (tests/support/fake_kube.py) on
loopback.

The cluster holds what the chart renders (TrainJob or PyTorchJob, the run-config ConfigMap), the vendored
`torch-distributed` ClusterTrainingRuntime, and pods as the controllers would make them from the rendered
pod templates; storage holds a committed checkpoint, an FID result and a given-up eval Job marker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trainjob_runtime
import yaml
from chart_helpers import NAMESPACE, one, render

from repa.cli import main as repa_main
from tests.support.fake_kube import FakeKube


def _pod(name: str, template: dict, labels: dict, restarts: int, phase: str = "Running") -> dict:
    meta = template.get("metadata", {})
    containers = template["spec"]["containers"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {**meta.get("labels", {}), **labels},
            "creationTimestamp": "2026-08-10T10:00:00Z",
        },
        "spec": template["spec"],
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": c["name"],
                    "restartCount": restarts,
                    "ready": True,
                    "image": c["image"],
                    "imageID": "",
                    "started": True,
                }
                for c in containers
            ],
        },
    }


def _storage(run_url: Path) -> None:
    step = run_url / "checkpoints" / "step-0000200"
    step.mkdir(parents=True)
    (step / "COMMITTED").write_text(json.dumps({"step": 200}))
    ev = run_url / "eval" / "step-0000200"
    ev.mkdir(parents=True)
    (ev / "result-abc.json").write_text(json.dumps({"fid": 31.25}))
    ev100 = run_url / "eval" / "step-0000100"
    ev100.mkdir(parents=True)
    marker = {"job": "myrun-repa-eval-step-0000100-abcdef", "state": "failed", "attempts": 3}
    (ev100 / "job-abc.json").write_text(json.dumps(marker))


def _cluster(kube: FakeKube, docs: list[dict], run_url: Path) -> None:
    cm = one(docs, "ConfigMap", "config")
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    cfg["storage"]["run_url"] = f"file://{run_url}"
    kube.add({**cm, "data": {"config.yaml": yaml.safe_dump(cfg)}})
    job = next(d for d in docs if d["kind"] in ("TrainJob", "PyTorchJob"))
    name = job["metadata"]["name"]
    if job["kind"] == "TrainJob":
        kube.add(
            {
                **job,
                "metadata": {**job["metadata"], "creationTimestamp": "2026-08-10T09:59:00Z"},
                "status": {
                    "conditions": [
                        {
                            "type": "Created",
                            "status": "True",
                            "reason": "JobSetCreated",
                            "message": "",
                            "lastTransitionTime": "2026-08-10T10:00:00Z",
                        }
                    ]
                },
            }
        )
        for runtime in trainjob_runtime.cluster_runtimes().values():
            kube.add(runtime)
        template, nodes = trainjob_runtime.resolve(job, docs)
        for index in range(nodes):
            labels = {
                "jobset.sigs.k8s.io/jobset-name": name,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": str(index),
            }
            pod = kube.add(_pod(f"{name}-node-0-{index}-x7k2q", template, labels, restarts=1))
            kube.logs[(NAMESPACE, pod["metadata"]["name"], "node")] = f"node {index} step 200 | loss 0.5\n"
    else:
        kube.add(
            {
                **job,
                "status": {
                    "conditions": [
                        {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
                        {"type": "Running", "status": "True", "reason": "PyTorchJobRunning"},
                    ]
                },
            }
        )
        template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
        for index in range(job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]):
            labels = {
                "training.kubeflow.org/job-name": name,
                "training.kubeflow.org/replica-type": "worker",
                "training.kubeflow.org/replica-index": str(index),
            }
            if index == 0:
                labels["training.kubeflow.org/job-role"] = "master"
            pod = kube.add(_pod(f"{name}-worker-{index}", template, labels, restarts=2))
            kube.logs[(NAMESPACE, pod["metadata"]["name"], "pytorch")] = f"worker {index} step 200\n"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeKube() as kube:
        monkeypatch.setenv("KUBECONFIG", kube.kubeconfig(tmp_path / "kubeconfig", NAMESPACE))
        yield kube


def repa(capsys, *argv: str) -> tuple[int, str, str]:
    code = repa_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_status_shows_the_job_its_pods_and_the_runs_progress(backend, cluster, tmp_path, capsys) -> None:
    docs = render("minimal", sets=(f"trainer.backend={backend}",))
    run_url = tmp_path / "run"
    _storage(run_url)
    _cluster(cluster, docs, run_url)
    code, out, err = repa(capsys, "status", "myrun")
    assert code == 0, err
    if backend == "trainjob":
        assert "TrainJob repa-ci/myrun-repa:" in out and "on runtime torch-distributed" in out
        assert "Created=True (JobSetCreated)" in out and "myrun-repa-node-0-0-x7k2q Running restarts=1" in out
    else:
        assert "PyTorchJob repa-ci/myrun-repa: Running" in out and "Running=True (PyTorchJobRunning)" in out
        assert "myrun-repa-worker-0 Running restarts=2" in out
    assert "latest checkpoint: step 200 (1 committed)" in out
    assert "FID: step 200: 31.25" in out
    assert "step 100 myrun-repa-eval-step-0000100-abcdef (failed, 3 attempt(s))" in out


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_logs_prints_the_first_workers_log(backend, cluster, tmp_path, capsys) -> None:
    docs = render("minimal", sets=(f"trainer.backend={backend}",))
    _cluster(cluster, docs, tmp_path / "run")
    code, out, err = repa(capsys, "logs", "myrun")
    assert code == 0, err
    assert out.strip() == ("node 0 step 200 | loss 0.5" if backend == "trainjob" else "worker 0 step 200")


def test_a_missing_job_and_a_forbidden_one_are_one_line_errors(cluster, capsys) -> None:
    code, out, err = repa(capsys, "status", "nosuchrun")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "no trainjob or pytorchjob repa-ci/nosuchrun-repa" in err and "Traceback" not in err
    cluster.forbidden.add("/apis/trainer.kubeflow.org")
    code, _, err = repa(capsys, "logs", "myrun")
    assert code == 2 and err.count("\n") == 1
    assert "no permission to read trainjob repa-ci/myrun-repa (HTTP 403)" in err
