"""`repa status RELEASE`: one screen that answers "how is my run doing".

From the cluster, through the kubeflow SDKs: the trainer's phase, conditions, pods and restarts, for a
TrainJob (``kubeflow.trainer.TrainerClient`` + ``kubeflow_trainer_api`` models) or a PyTorchJob
(``kubeflow.training.TrainingClient``), whichever the release has (docs/kubernetes.md "Two backends").
Which of the two CRDs the cluster has is asked first (API discovery), so "the TrainJob CRD is not
installed" (install Kubeflow Trainer) is told apart from "no such release" (the name or namespace).
From storage (the run config is the release's ConfigMap ``<fullname>-config``): the latest committed
checkpoint, images/s from the last TensorBoard log, the last FID per checkpoint and the eval Jobs that
failed or whose checkpoint was deleted (the watcher's ``job-<digest>.json`` markers, repa.eval.watch_jobs).
``--context`` / ``--kubeconfig`` / ``-n`` as kubectl's. Errors (not found, no permission, no CRD, an API
server that does not answer) are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from repa import storage
from repa.cluster import kube
from repa.config import ConfigError, RunConfig

__all__ = [
    "JobView",
    "add_arguments",
    "add_cluster_arguments",
    "cluster_view",
    "run",
    "storage_view",
    "trainer_kind",
]

TRAINJOB_POD_SELECTOR = "jobset.sigs.k8s.io/jobset-name={name}"
PYTORCHJOB_POD_SELECTOR = "training.kubeflow.org/job-name={name}"


@dataclass
class JobView:
    kind: str  # TrainJob | PyTorchJob
    name: str
    namespace: str
    phase: str
    conditions: list[tuple[str, str, str]] = field(default_factory=list)  # (type, status, reason)
    pods: list[tuple[str, str, int]] = field(default_factory=list)  # (name, phase, restarts)
    detail: str = ""
    worker_container: str = ""


def _pods(core: Any, namespace: str, selector: str) -> list[tuple[str, str, int]]:
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    out = []
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        restarts = sum(c.restart_count or 0 for c in (pod.status.container_statuses or []))
        out.append((pod.metadata.name, pod.status.phase or "Unknown", restarts))
    return out


def _trainjob(conf: Any, name: str, namespace: str) -> JobView:
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient
    from kubeflow_trainer_api import models
    from kubernetes import client

    # The SDK warns when it cannot read the Trainer's version ConfigMap (kubeflow-system); not our concern.
    logging.getLogger("kubeflow.trainer.backends.kubernetes.backend").setLevel(logging.ERROR)
    trainer = TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=conf))
    job = trainer.get_job(name)
    api = client.ApiClient(conf)
    raw = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "trainer.kubeflow.org", "v1alpha1", namespace, "trainjobs", name
    )
    cr = models.TrainerV1alpha1TrainJob.from_dict(raw)
    conditions = [(c.type, c.status, c.reason or "") for c in ((cr.status and cr.status.conditions) or [])]
    steps = ", ".join(f"{s.name} {s.status}" for s in job.steps) or "none yet"
    return JobView(
        "TrainJob",
        name,
        namespace,
        job.status,
        conditions,
        _pods(client.CoreV1Api(api), namespace, TRAINJOB_POD_SELECTOR.format(name=name)),
        f"{job.num_nodes} node(s) on runtime {job.runtime.name}; steps: {steps}",
        "node",
    )


def _pytorchjob(conf: Any, name: str, namespace: str) -> JobView:
    from kubeflow.training import TrainingClient

    trainer = TrainingClient(client_configuration=conf, namespace=namespace, job_kind="PyTorchJob")
    job = trainer.get_job(name)
    conditions = [(c.type, c.status, c.reason or "") for c in ((job.status and job.status.conditions) or [])]
    phase = next((t for t, s, _ in reversed(conditions) if s == "True"), "Created")
    pods = []
    for pod in sorted(trainer.get_job_pods(name), key=lambda p: p.metadata.name):
        restarts = sum(c.restart_count or 0 for c in (pod.status.container_statuses or []))
        pods.append((pod.metadata.name, pod.status.phase or "Unknown", restarts))
    policy = job.spec.elastic_policy
    sizes = f"elastic {policy.min_replicas}..{policy.max_replicas} workers" if policy else "workers"
    return JobView("PyTorchJob", name, namespace, phase, conditions, pods, sizes, "pytorch")


TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
PYTORCHJOB_API = ("kubeflow.org", "v1", "pytorchjobs")


def installed_backends(conf: Any) -> list[str]:
    """The trainer kinds whose CRD the API server serves: ``TrainJob``, ``PyTorchJob`` (in that order)."""
    from kubernetes import client

    api = client.ApiClient(conf)
    kinds = (("TrainJob", TRAINJOB_API), ("PyTorchJob", PYTORCHJOB_API))
    return [kind for kind, (group, version, plural) in kinds if kube.served(api, group, version, plural)]


def not_installed(namespace: str, name: str) -> kube.KubeError:
    return kube.KubeError(
        f"the TrainJob CRD is not installed on this cluster ({TRAINJOB_API[2]}.{TRAINJOB_API[0]}), nor "
        f"the PyTorchJob CRD, so there is no {namespace}/{name} to show: install Kubeflow Trainer v2 "
        '(docs/kubernetes.md "Cluster prerequisites"), or check --context'
    )


def no_such_release(namespace: str, name: str, backends: list[str]) -> kube.KubeError:
    kinds = " or ".join(k.lower() for k in backends)
    crd = "" if "TrainJob" in backends else "; the TrainJob CRD is not installed on this cluster"
    return kube.KubeError(
        f"no such release: no {kinds} {namespace}/{name} (check the release name, -n and --context: "
        f"`helm list -n {namespace}`){crd}"
    )


def trainer_kind(conf: Any, name: str, namespace: str) -> str:
    """``TrainJob`` or ``PyTorchJob``: the kind of the release's trainer ``namespace/name``; KubeError when
    neither CRD is installed, neither object exists, or it may not be read."""
    from kubernetes import client

    backends = installed_backends(conf)
    if not backends:
        raise not_installed(namespace, name)
    custom = client.CustomObjectsApi(client.ApiClient(conf))
    apis = {"TrainJob": TRAINJOB_API, "PyTorchJob": PYTORCHJOB_API}
    for kind in backends:
        group, version, plural = apis[kind]
        try:
            custom.get_namespaced_custom_object(group, version, namespace, plural, name)
            return kind
        except Exception as e:
            if not kube.is_not_found(e):
                raise kube.api_error(e, f"{kind.lower()} {namespace}/{name}") from None
    raise no_such_release(namespace, name, backends)


def cluster_view(conf: Any, name: str, namespace: str) -> JobView:
    """The release's TrainJob, else its PyTorchJob (see :func:`trainer_kind`)."""
    kind = trainer_kind(conf, name, namespace)
    try:
        return (_trainjob if kind == "TrainJob" else _pytorchjob)(conf, name, namespace)
    except Exception as e:
        raise kube.api_error(e, f"{kind.lower()} {namespace}/{name}") from None


def storage_view(cfg: RunConfig) -> list[str]:
    """Lines about the run's progress read from ``cfg.storage.run_url``."""
    from repa import checkpoint as ckpt

    run_url = cfg.storage.run_url.rstrip("/")
    run = cfg.storage.locate(run_url)
    lines = [f"storage {run_url}"]
    committed, _ = ckpt.list_checkpoints(run)
    if committed:
        lines.append(f"  latest checkpoint: step {committed[-1].step} ({len(committed)} committed)")
    else:
        lines.append("  latest checkpoint: none committed yet")
    with contextlib.suppress(Exception):  # no events yet, or TensorBoard unreadable: say nothing
        from repa.tensorboard import read_scalars

        speed = read_scalars(storage.join(run, "tensorboard")).get("perf/images_per_second")
        if speed:
            lines.append(f"  throughput: {speed[-1][1]:.1f} samples/s (step {speed[-1][0]})")
    fids, failed = [], []
    evals = storage.join(run, "eval")
    folders = storage.listdir(evals) if storage.exists(evals) else []
    for folder in sorted(folders):
        step_dir = folder.rstrip("/").rsplit("/", 1)[-1]
        if not step_dir.startswith("step-"):
            continue
        step = int(step_dir.removeprefix("step-"))
        for url in sorted(storage.listdir(storage.join(evals, step_dir))):
            leaf = url.rstrip("/").rsplit("/", 1)[-1]
            if not (leaf.startswith(("result-", "job-")) and leaf.endswith(".json")):
                continue  # a guidance sweep's sweep-<digest>/ folder, or anything else
            data = json.loads(storage.read_bytes(storage.join(evals, step_dir, leaf)))
            if leaf.startswith("result-") and "fid" in data:
                if (data.get("protocol") or {}).get("sweep_cell"):
                    continue  # a guidance sweep's small-sample cell: its heat map, not the run's score
                fids.append(f"step {step}: {data.get('score_label', 'FID')} {data['fid']:.2f}")
            elif leaf.startswith("job-") and data.get("state") in ("failed", "checkpoint-deleted"):
                what = "failed" if data["state"] == "failed" else "checkpoint deleted before it ran"
                failed.append(f"step {step} {data['job']} ({what}, {data.get('attempts', 1)} attempt(s))")
    lines.append(f"  scores: {', '.join(fids[-5:]) if fids else 'no results yet'}")
    if failed:
        lines.append(f"  eval Jobs not done: {'; '.join(failed)}")
    return lines


def render(view: JobView) -> list[str]:
    lines = [f"{view.kind} {view.namespace}/{view.name}: {view.phase}", f"  {view.detail}"]
    if view.conditions:
        lines.append(
            "  conditions: " + ", ".join(f"{t}={s}" + (f" ({r})" if r else "") for t, s, r in view.conditions)
        )
    restarts = sum(r for _, _, r in view.pods)
    lines.append(f"  pods: {len(view.pods)}, restarts {restarts}")
    lines += [f"    {n} {p} restarts={r}" for n, p, r in view.pods]
    return lines


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """RELEASE, -n, --fullname, --context, --kubeconfig: kubectl's meanings (shared with `repa logs`)."""
    parser.add_argument("release", help="Helm release of helm/repa")
    parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    parser.add_argument("--fullname", help="the release's fullnameOverride, if it set one")
    parser.add_argument("--context", help="kubeconfig context to use (default: the current context)")
    parser.add_argument(
        "--kubeconfig", metavar="PATH", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)


def release_config(conf: Any, names: kube.ReleaseNames, namespace: str) -> RunConfig:
    from kubernetes import client

    what = f"configmap {namespace}/{names.config_map}"
    try:
        data = (
            client.CoreV1Api(client.ApiClient(conf))
            .read_namespaced_config_map(names.config_map, namespace)
            .data
        )
    except Exception as e:
        raise kube.api_error(e, what) from None
    return RunConfig.from_yaml((data or {}).get("config.yaml", ""))


def run(args: argparse.Namespace) -> int:
    names = kube.ReleaseNames.of(args.release, args.fullname)
    namespace = args.namespace or kube.current_namespace(context=args.context, kubeconfig=args.kubeconfig)
    try:
        conf = kube.configuration(args.context, args.kubeconfig)
        lines = render(cluster_view(conf, names.job, namespace))
        cfg = release_config(conf, names, namespace)
        if cfg.storage.run_url:
            lines += storage_view(cfg)
    except kube.KubeError as e:
        print(f"repa status: error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, OSError, storage.StorageError) as e:
        print(f"repa status: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
