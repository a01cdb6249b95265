"""`repa status` and `repa logs` against a fake Kubernetes API server (tests/support/fake_kube.py) on
loopback.

The cluster holds what the chart renders (TrainJob or PyTorchJob, the run-config ConfigMap), the vendored
`torch-distributed` ClusterTrainingRuntime, and pods as the controllers would make them from the rendered
pod templates; storage holds a committed checkpoint, an FID result and a given-up eval Job marker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trainjob_runtime
import yaml
from chart_helpers import NAMESPACE, ROOT, one, render

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
    (ev / "result-abc.json").write_text(json.dumps({"fid": 31.25, "score_label": "FID (50000 samples)"}))
    cell = {"fid": 30.5, "score_label": "FID (1000 samples)", "protocol": {"sweep_cell": True}}
    (ev / "result-cell.json").write_text(json.dumps(cell))  # a guidance sweep's cell: not the run's score
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
    assert "scores: step 200: FID (50000 samples) 31.25\n" in out  # the sweep cell's 30.50 is not listed
    assert "step 100 myrun-repa-eval-step-0000100-abcdef (failed, 3 attempt(s))" in out


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_logs_prints_the_first_workers_log(backend, cluster, tmp_path, capsys) -> None:
    docs = render("minimal", sets=(f"trainer.backend={backend}",))
    _cluster(cluster, docs, tmp_path / "run")
    code, out, err = repa(capsys, "logs", "myrun")
    assert code == 0, err
    assert out.strip() == ("node 0 step 200 | loss 0.5" if backend == "trainjob" else "worker 0 step 200")


def test_a_missing_release_and_a_forbidden_one_are_one_line_errors(cluster, capsys) -> None:
    code, out, err = repa(capsys, "status", "nosuchrun")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert (
        "no such release: no trainjob or pytorchjob repa-ci/nosuchrun-repa" in err and "Traceback" not in err
    )
    assert "CRD" not in err
    cluster.forbidden.add("/apis/trainer.kubeflow.org/v1alpha1/namespaces")
    code, _, err = repa(capsys, "logs", "myrun")
    assert code == 2 and err.count("\n") == 1
    assert "no permission to read trainjob repa-ci/myrun-repa (HTTP 403)" in err


@pytest.mark.parametrize("verb", ["status", "logs"])
def test_a_cluster_without_the_trainjob_crd_is_told_apart_from_a_missing_release(
    verb, cluster, capsys
) -> None:
    cluster.served.clear()  # neither Kubeflow API installed
    code, out, err = repa(capsys, verb, "myrun")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "the TrainJob CRD is not installed" in err and "no such release" not in err
    cluster.served.add("kubeflow.org/v1")  # only the Training Operator: the release is just not there
    code, out, err = repa(capsys, verb, "myrun")
    assert code == 2 and err.count("\n") == 1
    assert "no such release: no pytorchjob repa-ci/myrun-repa" in err
    assert "the TrainJob CRD is not installed on this cluster" in err


def _kubeconfig(path: Path, contexts: dict[str, tuple[str, str]], current: str) -> str:
    """A kubeconfig with one cluster per context: name -> (server URL, namespace)."""
    text = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": n, "cluster": {"server": url}} for n, (url, _) in contexts.items()],
            "users": [{"name": "u", "user": {"token": "fake"}}],
            "contexts": [
                {"name": n, "context": {"cluster": n, "user": "u", "namespace": ns}}
                for n, (_, ns) in contexts.items()
            ],
            "current-context": current,
        }
    )
    path.write_text(text)
    return str(path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections are refused


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_context_and_kubeconfig_pick_the_cluster_and_namespace_as_kubectl_does(
    backend, cluster, tmp_path, capsys
) -> None:
    docs = render("minimal", sets=(f"trainer.backend={backend}",))
    _storage(tmp_path / "run")
    _cluster(cluster, docs, tmp_path / "run")
    down = f"http://127.0.0.1:{_closed_port()}"
    config = _kubeconfig(
        tmp_path / "two-clusters",
        {"down": (down, "elsewhere"), "lab": (cluster.url, NAMESPACE)},
        current="down",
    )
    code, out, err = repa(capsys, "status", "myrun", "--kubeconfig", config, "--context", "lab")
    assert code == 0, err
    assert "repa-ci/myrun-repa" in out  # the context's namespace
    code, out, err = repa(capsys, "logs", "myrun", "--kubeconfig", config, "--context", "lab")
    assert code == 0 and "step 200" in out, err
    code, _, err = repa(capsys, "status", "myrun", "--kubeconfig", config)  # the current context: down
    assert code == 2 and "cannot reach the Kubernetes API server" in err
    code, _, err = repa(capsys, "status", "myrun", "--kubeconfig", config, "--context", "nosuch")
    assert code == 2 and err.count("\n") == 1 and "context nosuch" in err


def test_an_api_server_that_is_down_is_one_line_without_retry_warnings(tmp_path) -> None:
    """A real process (logging as the CLI configures it): urllib3's default retries would log three
    `Retrying (Retry(total=...))` warnings before the error."""
    port = _closed_port()
    config = _kubeconfig(tmp_path / "down", {"down": (f"http://127.0.0.1:{port}", NAMESPACE)}, current="down")
    env = {**os.environ, "KUBECONFIG": config, "PYTHONPATH": str(ROOT)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    for verb in ("status", "logs"):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "repa", verb, "myrun"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert f"cannot reach the Kubernetes API server (127.0.0.1:{port}: " in proc.stderr
        assert "Connection refused" in proc.stderr and "Retrying" not in proc.stderr
        print(f"repa {verb} against a down API server: exit 2 in {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_logs_take_tail_since_previous_and_follow_with_kubectls_meanings(
    backend, cluster, tmp_path, capsys
) -> None:
    docs = render("minimal", sets=(f"trainer.backend={backend}",))
    _cluster(cluster, docs, tmp_path / "run")
    pod, container = next(k for k in cluster.logs if k[1].endswith(("-0-0-x7k2q", "-worker-0")))[1:]
    cluster.logs[(NAMESPACE, pod, container)] = "".join(f"step {i}\n" for i in range(1, 6))
    cluster.previous_logs[(NAMESPACE, pod, container)] = "before the restart: CUDA error\n"
    code, out, err = repa(capsys, "logs", "myrun", "--tail", "2")
    assert code == 0 and out == "step 4\nstep 5\n", err
    code, out, err = repa(capsys, "logs", "myrun", "--previous")
    assert code == 0 and out == "before the restart: CUDA error\n", err
    code, out, err = repa(capsys, "logs", "myrun", "--since", "1h30m", "-f")
    assert code == 0 and out.endswith("step 5\n"), err
    query = [r for r in cluster.requests if "/log?" in r][-1]
    assert "sinceSeconds=5400" in query and "follow=true" in query.lower()
    code, _, err = repa(capsys, "logs", "myrun", "--since", "5")  # kubectl wants a unit
    assert code == 2 and "--since" in err
    del cluster.previous_logs[(NAMESPACE, pod, container)]
    code, _, err = repa(capsys, "logs", "myrun", "-p")
    assert code == 2 and err.count("\n") == 1
    assert f'previous terminated container "{container}" in pod "{pod}" not found' in err
    code, _, err = repa(capsys, "logs", "myrun", "--node", "7")
    assert code == 2 and "no pod for" in err and "7" in err
