"""The rendered chart RUNS: its PyTorchJob or TrainJob trains and its eval Job evaluates, as a cluster would.

No cluster here, so these tests play the parts of the Kubeflow Training Operator (v1.9, elastic mode) or
the Kubeflow Trainer v2.3.0 controller, the kubelet and the eval launcher, and of nothing else.
From `helm template` of helm/repa/ci/emulation.yaml
(a tiny CPU run on a moto S3 server):

- the operator: one process per Worker replica, running the `pytorch` container's command + args with the
  environment the operator injects in elastic mode (docs/kubernetes.md): PYTHONUNBUFFERED=1,
  PET_NPROC_PER_NODE from spec.nprocPerNode, PET_NNODES=min:max, PET_RDZV_BACKEND, PET_RDZV_ENDPOINT (in a
  cluster `<job>-worker-0:23456`; here 127.0.0.1 and a free port), PET_MAX_RESTARTS, PET_RDZV_ID,
  PET_RDZV_CONF;
- the kubelet: the container's `envFrom` Secrets (the "cluster" holds the moto credentials), `env` with
  `fieldRef`s resolved and `$(VAR)` expanded as Kubernetes does, the volumes materialised in a per-pod
  folder (the ConfigMaps' files, empty dirs), and mount paths in args/env mapped into that folder;
  the image's ENV (docker/Dockerfile*) with its paths mapped the same way; WORKDIR = HOME;
- the eval launcher: `repa watch --launch-jobs` (the launcher Deployment's rendered args) in-process with
  a recording Kubernetes API, so the Job that is run is exactly the one the launcher would create.

Then: both workers exit 0, the committed checkpoint is at train.max_steps and says world_size 2, the
eval Job's container exits 0 and its result JSON is where the watcher looks for it.

The TrainJob test (backend `trainjob`, the chart's default) renders the same profile as a 2-node TrainJob
on the cluster's `torch-distributed` runtime: the Trainer controller's part is tests/chart/trainjob_runtime.py
(runtime pod template + runtimePatches + spec.trainer, then the torch plugin's PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK from the Job completion index, PET_MASTER_ADDR/PORT); the JobSet's
headless Service becomes loopback, and workload identity (no Secret: runtimePatches cannot carry
envFrom) becomes the moto keys in the pod's environment, as the identity webhook injects them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import trainjob_runtime
import yaml
from chart_helpers import NAMESPACE, load_yaml_docs, one, profile_file, run, template_cmd

from repa import checkpoint as ckpt
from repa import storage
from repa.config import load_config

PROFILE = "emulation"
CONFIG_PATH = "/etc/repa/config.yaml"  # the chart's mount of the run config (repa.configPath)
OPERATOR_RDZV_PORT = 23456  # the operator's default rdzvPort
SECRET_NAME = "repa-s3-credentials"  # storageAuth.existingSecret in the profile
# The image's ENV (docker/Dockerfile) that matters for where files go.
IMAGE_ENV = {
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HOME": "/home/repa",
    "XDG_CACHE_HOME": "/home/repa/.cache",
    "TORCH_HOME": "/home/repa/.cache/torch",
    "HF_HOME": "/home/repa/.cache/huggingface",
    "MPLCONFIGDIR": "/tmp/matplotlib",
}
IMAGE_WORKDIR = "/home/repa"
TRAIN_TIMEOUT_S = 300
EVAL_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------------------
# The "cluster": objects the kubelet resolves references against
# ------------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    namespace: str
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (command, args, env values): defined names are replaced, undefined
    ones stay as written, `$$` is a literal `$` (k8s.io/kubernetes third_party/forked/golang/expansion)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def resolve_env(
    container: dict, cluster: Cluster, pod_name: str, fields: dict[str, str] | None = None
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom in order, then env (which wins).
    ``fields``: more downward-API values (e.g. the Job completion-index annotation)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            name, store = source["secretRef"]["name"], cluster.secrets
        else:
            name, store = source["configMapRef"]["name"], cluster.configmaps
        assert name in store, f"CreateContainerConfigError: {name} not found (envFrom of {pod_name})"
        env.update({prefix + k: v for k, v in store[name].items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            fields = {
                "metadata.namespace": cluster.namespace,
                "metadata.name": pod_name,
                "spec.nodeName": "emulated-node",
                "status.podIP": "127.0.0.1",
                **(fields or {}),
            }
            path = ref["fieldRef"]["fieldPath"]
            assert path in fields, f"env {name}: fieldRef {path} is not emulated"
            env[name] = fields[path]
        elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
            kind = "secretKeyRef" if "secretKeyRef" in ref else "configMapKeyRef"
            store = cluster.secrets if kind == "secretKeyRef" else cluster.configmaps
            env[name] = store[ref[kind]["name"]][ref[kind]["key"]]
        else:  # resourceFieldRef: limits are not emulated
            raise AssertionError(f"env {name}: {sorted(ref)} is not emulated")
    return env


def materialize_volumes(pod_spec: dict, cluster: Cluster, root: Path) -> dict[str, Path]:
    """Each volumeMount of the (only) container as a folder under ``root``; returns mountPath -> folder."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    (container,) = pod_spec["containers"]
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        folder = root / mount["mountPath"].lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            sources = [volume]
        elif "projected" in volume:
            sources = volume["projected"]["sources"]
        else:
            assert "emptyDir" in volume, f"volume {mount['name']}: {sorted(volume)} is not emulated"
            sources = []
        for source in sources:
            assert "configMap" in source, f"volume {mount['name']}: {sorted(source)} is not emulated"
            data = cluster.configmaps[source["configMap"]["name"]]
            items = source["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (folder / item["path"]).write_text(data[item["key"]])
        mounts[mount["mountPath"]] = folder
    return mounts


def to_local(value: str, mounts: dict[str, Path], root: Path) -> str:
    """A path inside the container -> the emulated pod's folder (mounts first, then the image root)."""
    if not value.startswith("/"):
        return value
    for path in sorted(mounts, key=len, reverse=True):
        if value == path or value.startswith(path.rstrip("/") + "/"):
            return str(mounts[path]) + value[len(path) :]
    return str(root / value.lstrip("/"))


# ------------------------------------------------------------------------------------------------
# The Training Operator (v1.9, elastic, Workers only)
# ------------------------------------------------------------------------------------------------


def operator_env(job: dict) -> dict[str, str]:
    """Exactly what the operator (v1.9) adds to every container of an elastic PyTorchJob."""
    spec = job["spec"]
    assert "Master" not in spec["pytorchReplicaSpecs"], "the chart's job is Workers only"
    policy = spec["elasticPolicy"]
    low = policy.get("minReplicas", policy.get("maxReplicas"))
    high = policy.get("maxReplicas", low)
    if low is None:
        low = high = spec["pytorchReplicaSpecs"]["Worker"].get("replicas", 1)
    host = policy.get("rdzvHost", f"{job['metadata']['name']}-worker-0")
    env = {
        "PYTHONUNBUFFERED": "1",
        "PET_NPROC_PER_NODE": str(spec.get("nprocPerNode", "auto")),
        "PET_NNODES": f"{low}:{high}",
        "PET_RDZV_BACKEND": policy.get("rdzvBackend", "c10d"),
        "PET_RDZV_ENDPOINT": f"{host}:{policy.get('rdzvPort', OPERATOR_RDZV_PORT)}",
    }
    if "maxRestarts" in policy:
        env["PET_MAX_RESTARTS"] = str(policy["maxRestarts"])
    if "rdzvId" in policy:
        env["PET_RDZV_ID"] = str(policy["rdzvId"])
    if policy.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{kv['key']}={kv['value']}" for kv in policy["rdzvConf"])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# The kubelet: start one container as a local process
# ------------------------------------------------------------------------------------------------


def _search_path() -> str:
    """The venv's bin/ (where `torchrun` and `repa` live, as on the image's PATH) and the system's."""
    return os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])


def _argv(container: dict, env: dict[str, str], mounts: dict[str, Path], root: Path) -> list[str]:
    words = [expand(w, env) for w in [*container["command"], *container.get("args", [])]]
    assert not any("$(" in w for w in words), f"unexpanded variable in {words}"
    exe = shutil.which(words[0], path=env["PATH"])
    if exe is not None:
        head = [exe]
    elif words[0] == "torchrun":  # an environment without the console script: the same entry point
        head = [sys.executable, "-m", "torch.distributed.run"]
    else:
        raise AssertionError(f"{words[0]}: not on PATH {env['PATH']}")
    return head + [to_local(w, mounts, root) for w in words[1:]]


@dataclass
class Container:
    name: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_container(
    pod_name: str,
    pod_spec: dict,
    cluster: Cluster,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
) -> Container:
    root = workdir / pod_name
    mounts = materialize_volumes(pod_spec, cluster, root)
    (container,) = pod_spec["containers"]
    env = {k: to_local(v, mounts, root) for k, v in IMAGE_ENV.items()}
    # /tmp is an emptyDir in the pod; a local process finds its temp dir through TMPDIR.
    env["TMPDIR"] = to_local("/tmp", mounts, root)
    env["PATH"] = _search_path()
    # The CI machine's few cores are shared by several "pods": one thread each, as on a 1-CPU node.
    env["OMP_NUM_THREADS"] = "1"
    resolved = resolve_env(container, cluster, pod_name, fields)
    env.update({k: to_local(v, mounts, root) for k, v in resolved.items()})
    env.update(extra_env or {})
    home = Path(env["HOME"])
    home.mkdir(parents=True, exist_ok=True)
    Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    argv = _argv(container, env, mounts, root)
    log = workdir / f"{pod_name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=to_local(IMAGE_WORKDIR, mounts, root),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Container(pod_name, proc, log)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return children + [d for c in children for d in _descendants(c)]


def stop_all(containers: list[Container]) -> None:
    """Kill what is still running (only on failure paths): the processes this test started and theirs."""
    for c in containers:
        if c.proc.poll() is None:
            for pid in [*_descendants(c.proc.pid), c.proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            c.proc.wait(timeout=30)


def wait_all(containers: list[Container], timeout: float, stop_on_failure: bool = True) -> dict[str, int]:
    """Exit codes once all have exited; the first failure stops the rest (a peer would wait for it until
    the rendezvous join_timeout) unless ``stop_on_failure`` is False; a timeout fails the test with the
    logs."""
    deadline = time.monotonic() + timeout
    while any(c.proc.poll() is None for c in containers):
        if stop_on_failure and any(c.proc.poll() not in (None, 0) for c in containers):
            stop_all(containers)
            break
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {c.name}:\n{c.output()[-3000:]}" for c in containers)
            stop_all(containers)
            raise AssertionError(f"still running after {timeout} s\n{logs}")
        time.sleep(0.2)
    return {c.name: c.proc.returncode for c in containers}


# ------------------------------------------------------------------------------------------------
# The eval launcher's Kubernetes API
# ------------------------------------------------------------------------------------------------


class RecordingBatchApi:
    """`BatchV1Api.create_namespaced_job` that keeps the Jobs (the API server accepts them)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, dict]] = []

    def create_namespaced_job(self, namespace: str, body: dict, **_: Any) -> dict:
        self.jobs.append((namespace, body))
        return body


# ------------------------------------------------------------------------------------------------
# Fixtures: data, reference statistics, Inception weights on the moto S3 server
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _render(
    tmp_path: Path,
    s3_server: str,
    bucket: str,
    *,
    release: str = "myrun",
    sets: tuple[str, ...] = (),
    **more: Any,
) -> list[dict]:
    overrides: dict[str, Any] = {
        "config": {
            "data": {"url": f"{bucket}/shards"},
            "storage": {"run_url": f"{bucket}/run"},
            "eval": {
                "reference_stats_url": f"{bucket}/refstats/ref-16px.npz",
                "inception_weights_url": f"{bucket}/weights/random-inception.pth",
            },
        },
        "storageAuth": {"env": {"AWS_ENDPOINT_URL_S3": s3_server}},
    }
    for key, value in more.items():
        overrides[key] = {**overrides.get(key, {}), **value}
    values = tmp_path / f"emulation-overrides-{release}.yaml"
    values.write_text(yaml.safe_dump(overrides))
    cmd = template_cmd(values=(str(profile_file(PROFILE)), str(values)), sets=sets, release=release)
    return load_yaml_docs(run(cmd).stdout)


def _prepare_data(tmp_path: Path, data_url: str) -> None:
    from repa.data.prepare import prepare_images, prepare_latents
    from tests.support.datasets import make_imagenet_tree

    tree = make_imagenet_tree(tmp_path / "source", per_class=6, corrupt=0)
    prepare_images(str(tree.root), data_url, resolution=16, samples_per_shard=4)
    prepare_latents(data_url, vae="none", batch_size=8)


def _prepare_eval_inputs(cfg: Any) -> None:
    """Random-weights Inception on storage, and reference statistics of the dataset made with it."""
    from repa.eval.features import build_inception
    from repa.eval.refstats import compute_dataset_reference_stats
    from tests.support.fidelity_weights import random_inception_weights_path

    weights = random_inception_weights_path()
    storage.write_bytes_atomic(cfg.eval.inception_weights_url, Path(weights).read_bytes())
    compute_dataset_reference_stats(
        cfg.data.url, cfg.eval.reference_stats_url, build_inception(weights, device="cpu"), batch_size=32
    )


# ------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rendered_pytorchjob_trains_on_two_elastic_workers_and_its_eval_job_scores_the_checkpoint(
    tmp_path, s3_server, s3_bucket, one_thread, monkeypatch
):
    started = time.monotonic()
    docs = _render(tmp_path, s3_server, s3_bucket)
    cluster = Cluster(NAMESPACE)
    cluster.configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    # The Secret the release expects the user to create: the moto server's (fake) keys.
    cluster.secrets[SECRET_NAME] = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    config_map = one(docs, "ConfigMap", "config")
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(config_map["data"]["config.yaml"])
    cfg = load_config(str(cfg_file))
    run_url = cfg.storage.run_url
    _prepare_data(tmp_path, cfg.data.url)

    # --- the operator starts the Worker pods
    job = one(docs, "PyTorchJob")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    pod_spec = worker["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["name"] == "pytorch" and container["command"] == ["repa", "torchrun"]
    assert CONFIG_PATH in container["args"]
    injected = operator_env(job)
    assert injected["PET_RDZV_ENDPOINT"] == f"{job['metadata']['name']}-worker-0:{OPERATOR_RDZV_PORT}"
    assert injected["PET_NNODES"] == "1:2" and injected["PET_NPROC_PER_NODE"] == "1"
    # No cluster DNS here: every pod reaches "worker-0" on loopback.
    injected["PET_RDZV_ENDPOINT"] = f"127.0.0.1:{_free_port()}"
    assert worker["replicas"] == 2
    pods = tmp_path / "pods"
    names = [f"{job['metadata']['name']}-worker-{i}" for i in range(worker["replicas"])]
    workers = [start_container(name, pod_spec, cluster, pods, injected) for name in names]
    try:
        # While they train: what the eval Job will need (weights, reference statistics).
        _prepare_eval_inputs(cfg)
        codes = wait_all(workers, TRAIN_TIMEOUT_S)
    finally:
        stop_all(workers)
    logs = "\n".join(f"--- {w.name}:\n{w.output()[-4000:]}" for w in workers)
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{logs}"
    train_seconds = time.monotonic() - started

    committed, partial = ckpt.list_checkpoints(run_url)
    every = cfg.checkpoint.every_steps
    assert [r.step for r in committed] == list(range(every, cfg.train.max_steps + 1, every)), logs
    assert partial == []
    latest = committed[-1]
    state = ckpt.load_checkpoint_state(latest)
    assert state["step"] == cfg.train.max_steps
    assert state["world_size"] == 2, "both workers must have joined one rendezvous"
    assert state["reader"]["samples_consumed"] == cfg.train.max_steps * cfg.train.global_batch_size
    assert state["config"] == cfg.to_dict(), "the trainer must run the ConfigMap's config"

    # --- the eval launcher (`repa watch --launch-jobs`, its rendered args + --once) creates the Jobs
    from repa.cli import main as repa_main
    from repa.cluster import jobs

    launcher = one(docs, "Deployment", "eval-launcher")
    launcher_root = pods / "eval-launcher"
    launcher_pod = launcher["spec"]["template"]["spec"]
    launcher_mounts = materialize_volumes(launcher_pod, cluster, launcher_root)
    (launcher_container,) = launcher_pod["containers"]
    assert launcher_container["command"] == ["repa"]
    launcher_args = [to_local(a, launcher_mounts, launcher_root) for a in launcher_container["args"]]
    # The template's mount path comes from the container's REPA_EVAL_JOB_TEMPLATE; `repa watch` does not
    # read that variable (its --job-template default is the same path), so it is passed as the flag.
    template_env = {e["name"]: e.get("value") for e in launcher_container.get("env") or []}
    template_path = to_local(template_env["REPA_EVAL_JOB_TEMPLATE"], launcher_mounts, launcher_root)
    api = RecordingBatchApi()
    monkeypatch.setattr(jobs, "batch_api", lambda: api)
    assert repa_main([*launcher_args, "--once", "--job-template", template_path]) == 0
    created = {int(body["metadata"]["labels"]["repa.io/checkpoint-step"]): body for _, body in api.jobs}
    assert sorted(created) == [r.step for r in committed]
    eval_job = created[latest.step]
    assert len(eval_job["metadata"]["name"]) <= 63
    assert {ns for ns, _ in api.jobs} == {NAMESPACE}

    # --- the Job controller starts its pod; the kubelet expands $(REPA_CHECKPOINT_URL) in the args
    eval_pod = eval_job["spec"]["template"]["spec"]
    (eval_container,) = eval_pod["containers"]
    assert "$(REPA_CHECKPOINT_URL)" in eval_container["args"]
    evaluator = start_container(f"{eval_job['metadata']['name']}-emul0", eval_pod, cluster, pods)
    try:
        code = wait_all([evaluator], EVAL_TIMEOUT_S)[evaluator.name]
    finally:
        stop_all([evaluator])
    assert code == 0, evaluator.output()[-4000:]

    digest = eval_job["metadata"]["labels"]["repa.io/eval-digest"]
    result_url = storage.join(run_url, "eval", ckpt.step_dir_name(latest.step), f"result-{digest}.json")
    assert storage.exists(result_url), f"no result at {result_url}:\n{evaluator.output()[-4000:]}"
    result = json.loads(storage.read_bytes(result_url))
    assert result["metric_name"] == "FD" and math.isfinite(result["fid"]) and result["fid"] >= 0
    assert result["num_samples"] == cfg.sample.num_samples
    assert result["protocol"]["checkpoint"]["url"] == latest.url
    assert result["protocol"]["checkpoint"]["step"] == latest.step
    # The watcher now counts this checkpoint as evaluated.
    marker = json.loads(storage.read_bytes(storage.join(result_url.rsplit("/", 1)[0], f"job-{digest}.json")))
    assert marker["result_url"] == result_url and marker["job"] == eval_job["metadata"]["name"]
    eval_seconds = time.monotonic() - started - train_seconds
    print(f"\noperator emulation: train {train_seconds:.1f} s, eval {eval_seconds:.1f} s")


def test_operator_env_follows_the_elastic_policy_of_the_rendered_job(tmp_path):
    """The injected variables are derived from the rendered spec, not hard-coded: torchrun reads them."""
    job = one(_render(tmp_path, "http://127.0.0.1:9000", "s3://unused"), "PyTorchJob")
    env = operator_env(job)
    policy = job["spec"]["elasticPolicy"]
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
        "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"{job['metadata']['name']}-worker-0:{OPERATOR_RDZV_PORT}",
        "PET_MAX_RESTARTS": str(policy["maxRestarts"]),
        "PET_RDZV_ID": policy["rdzvId"],
        "PET_RDZV_CONF": "join_timeout=120,last_call_timeout=120",
    }
    # PET_STANDALONE="" would crash torchrun (int('')): the chart must never ask for it.
    assert "standalone" not in policy
    assert expand("$(A)/$$(A)/$(B)", {"A": "x"}) == "x/$(A)/$(B)"


# ------------------------------------------------------------------------------------------------
# Backend trainjob: Kubeflow Trainer v2.3.0 (torch plugin, cluster runtime torch-distributed)
# ------------------------------------------------------------------------------------------------

TRAINJOB_VALUES = {
    "trainer": {"backend": "trainjob", "minReplicas": 2, "maxReplicas": 2, "replicas": None},
    "storageAuth": {"existingSecret": ""},  # workload identity: runtimePatches have no envFrom
    "evaluator": {"enabled": False},  # the PyTorchJob test runs the eval Job
}


@pytest.mark.slow
def test_rendered_trainjob_trains_on_two_nodes_of_the_torch_distributed_runtime_and_commits(
    tmp_path, s3_server, s3_bucket, one_thread
):
    docs = _render(tmp_path, s3_server, s3_bucket, **TRAINJOB_VALUES)
    assert not [d for d in docs if d["kind"] in ("PyTorchJob", "TrainingRuntime")]
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(one(docs, "ConfigMap", "config")["data"]["config.yaml"])
    cfg = load_config(str(cfg_file))
    _prepare_data(tmp_path, cfg.data.url)

    # --- the Trainer controller: runtime + runtimePatches + spec.trainer + the torch plugin's PET_*
    job = one(docs, "TrainJob")
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    pod, nodes = trainjob_runtime.resolve(job, docs)
    assert nodes == 2
    pod_spec = pod["spec"]
    (container,) = pod_spec["containers"]
    assert container["name"] == "node" and container["command"] == ["repa", "torchrun"]
    assert CONFIG_PATH in container["args"]
    name = job["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}"
    assert env["PET_NNODES"]["value"] == "2" and env["PET_NPROC_PER_NODE"]["value"] == "1"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == trainjob_runtime.COMPLETION_INDEX
    # No cluster DNS here: the JobSet's headless Service of pod 0 is loopback; the identity is the moto keys.
    identity = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    _, nodes_started = _start_trainjob(docs, "uid-myrun", tmp_path / "pods", identity)
    try:
        codes = wait_all(nodes_started, TRAIN_TIMEOUT_S)
    finally:
        stop_all(nodes_started)
    logs = "\n".join(f"--- {n.name}:\n{n.output()[-4000:]}" for n in nodes_started)
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{logs}"

    committed, partial = ckpt.list_checkpoints(cfg.storage.run_url)
    every = cfg.checkpoint.every_steps
    assert [r.step for r in committed] == list(range(every, cfg.train.max_steps + 1, every)), logs
    assert partial == []
    state = ckpt.load_checkpoint_state(committed[-1])
    assert state["step"] == cfg.train.max_steps
    assert state["world_size"] == 2, "both nodes must have joined one process group"
    assert state["config"] == cfg.to_dict(), "the trainer must run the ConfigMap's config"


def _start_trainjob(
    docs: list[dict], uid: str, pods: Path, extra_env: dict[str, str]
) -> tuple[dict, list[Container]]:
    """The Trainer controller, the JobSet controller (pod labels: name and ``uid``) and the kubelet start
    every node of the rendered TrainJob; the master address is loopback."""
    cluster = Cluster(NAMESPACE)
    cluster.configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    job = one(docs, "TrainJob")
    pod, nodes = trainjob_runtime.resolve(job, docs, uid=uid)
    name = job["metadata"]["name"]
    local = {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port())}
    fields = trainjob_runtime.downward_fields(pod)
    started = [
        start_container(
            f"{name}-node-0-{index}",
            pod["spec"],
            cluster,
            pods,
            {**extra_env, **local},
            fields={**fields, trainjob_runtime.COMPLETION_INDEX: str(index)},
        )
        for index in range(nodes)
    ]
    return job, started


def _latest_step(run_url: str) -> int:
    committed, _ = ckpt.list_checkpoints(run_url)
    return committed[-1].step if committed else 0


def _until(what: str, ready, running: list[Container], timeout: float) -> None:
    """Poll ``ready()`` while every container of ``running`` still runs (a test of liveness, not speed)."""
    deadline = time.monotonic() + timeout
    while not ready():
        exited = {c.name: c.proc.returncode for c in running if c.proc.poll() is not None}
        logs = "\n".join(f"--- {c.name}:\n{c.output()[-3000:]}" for c in running)
        assert not exited, f"exited before {what}: {exited}\n{logs}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{logs}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_second_trainjob_release_on_the_same_run_url_exits_5_on_every_node_and_the_first_trains_on(
    tmp_path, s3_server, s3_bucket, one_thread
):
    """Two releases, one run_url, 2 nodes each (issue 21): the chart's REPA_JOB_ID differs by TrainJob
    (torchrun's run id is "none" in both), so the second is refused by the run lease on every node."""
    sets = ("config.train.max_steps=1000000",)  # the first trains until this test stops it (SIGTERM)
    first_docs = _render(tmp_path, s3_server, s3_bucket, release="first", sets=sets, **TRAINJOB_VALUES)
    second_docs = _render(tmp_path, s3_server, s3_bucket, release="second", sets=sets, **TRAINJOB_VALUES)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(one(first_docs, "ConfigMap", "config")["data"]["config.yaml"])
    cfg = load_config(str(cfg_file))
    assert one(second_docs, "ConfigMap", "config")["data"]["config.yaml"] == cfg_file.read_text()
    _prepare_data(tmp_path, cfg.data.url)
    run_url = cfg.storage.run_url
    identity = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    pods = tmp_path / "pods"

    _, first = _start_trainjob(first_docs, "uid-first", pods, identity)
    second: list[Container] = []
    try:
        _until(
            "first checkpoint of the first release", lambda: _latest_step(run_url) > 0, first, TRAIN_TIMEOUT_S
        )
        _, second = _start_trainjob(second_docs, "uid-second", pods, identity)
        codes = wait_all(second, TRAIN_TIMEOUT_S, stop_on_failure=False)
        second_logs = "\n".join(f"--- {c.name}:\n{c.output()[-3000:]}" for c in second)
        assert set(codes.values()) == {5}, f"second release: exit codes {codes}\n{second_logs}"
        assert "is being trained by another process" in second_logs, second_logs
        assert "job trainjob/" in second_logs, second_logs  # the owner is named by its job identity
        # The first keeps training: it commits a newer checkpoint after the second is gone.
        after = _latest_step(run_url)
        _until(
            "checkpoint after the second release exited", lambda: _latest_step(run_url) > after, first, 120
        )
        for c in first:  # preemption of the first (the kubelet's SIGTERM to PID 1: repa torchrun)
            c.proc.send_signal(signal.SIGTERM)
        first_codes = wait_all(first, TRAIN_TIMEOUT_S, stop_on_failure=False)
    finally:
        stop_all(first + second)
    first_logs = "\n".join(f"--- {c.name}:\n{c.output()[-3000:]}" for c in first)
    assert set(first_codes.values()) <= {0, 143}, f"first release: exit codes {first_codes}\n{first_logs}"
    assert "taken over" not in first_logs, first_logs
    committed, _ = ckpt.list_checkpoints(run_url)
    assert committed and committed[-1].step > after
