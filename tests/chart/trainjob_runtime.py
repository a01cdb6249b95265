"""What the Kubeflow Trainer v2 controller makes of a TrainJob: its runtime's pod template, patched.

Read from kubeflow/trainer v2.3.0 (docs/kubernetes.md "Two backends"; the vendored CRDs and the
`torch-distributed` ClusterTrainingRuntime in tests/chart/assets/trainer-v2.3.0/):

1. the runtime (`spec.runtimeRef`: a TrainingRuntime in the namespace or a ClusterTrainingRuntime) gives
   the JobSet template; the replicated job `node` holds the trainer's pod template;
2. `spec.runtimePatches` are applied in order: pod metadata labels/annotations merged, pod-spec fields
   replaced, the keyed lists (containers, volumes, imagePullSecrets, ...) merged by `name`, a container's
   env merged by name and its volumeMounts by mountPath;
3. `spec.trainer` sets container `node`'s image, command, args and resources (resourcesPerNode) and
   merges its env;
4. the torch plugin injects PET_NNODES, PET_NPROC_PER_NODE (numProcPerNode, default "auto"),
   PET_NODE_RANK (the Job completion index, through the pod annotation), PET_MASTER_ADDR
   (`<trainjob>-node-0-0.<trainjob>`: pod 0 of Job 0 behind the JobSet's headless Service) and
   PET_MASTER_PORT (29500) into container `node`, and the Job runs numNodes Indexed pods;
5. the JobSet controller labels every pod with the JobSet's name (the TrainJob's) and uid
   (`jobset.sigs.k8s.io/jobset-name`, `jobset.sigs.k8s.io/jobset-uid`): one uid per TrainJob, kept
   across the JobSet's restarts (sigs.k8s.io/jobset, "JobSet labels").

A plain module (not conftest.py) shared by tests/chart/test_chart.py and test_operator_emulation.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ASSETS = Path(__file__).parent / "assets" / "trainer-v2.3.0"
NODE = "node"  # replicated job and container the torch plugin targets
MASTER_PORT = 29500
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOBSET_UID_LABEL = "jobset.sigs.k8s.io/jobset-uid"
TORCH_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
_KEYED_LISTS = ("containers", "initContainers", "volumes", "imagePullSecrets", "schedulingGates")


def cluster_runtimes() -> dict[str, dict]:
    """The ClusterTrainingRuntimes a Trainer v2.3.0 install provides (name -> object)."""
    runtime = yaml.safe_load((ASSETS / "torch_distributed_runtime.yaml").read_text())
    return {runtime["metadata"]["name"]: runtime}


def _merge_by(key: str, base: list[dict], patch: list[dict], merge_item) -> list[dict]:
    out = [copy.deepcopy(x) for x in base]
    index = {x[key]: i for i, x in enumerate(out)}
    for item in patch:
        if item[key] in index:
            out[index[item[key]]] = merge_item(out[index[item[key]]], item)
        else:
            out.append(copy.deepcopy(item))
    return out


def _merge_container(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if k == "env":
            out["env"] = _merge_by("name", out.get("env") or [], v, lambda a, b: copy.deepcopy(b))
        elif k == "volumeMounts":
            out[k] = _merge_by("mountPath", out.get(k) or [], v, lambda a, b: copy.deepcopy(b))
        else:
            out[k] = copy.deepcopy(v)
    return out


def _patch_pod(pod: dict, patch: dict) -> None:
    meta = pod.setdefault("metadata", {})
    for k in ("labels", "annotations"):
        if patch.get("metadata", {}).get(k):
            meta[k] = {**(meta.get(k) or {}), **patch["metadata"][k]}
    spec = pod.setdefault("spec", {})
    for k, v in (patch.get("spec") or {}).items():
        if k in _KEYED_LISTS:
            merge = _merge_container if k.endswith("ontainers") else (lambda a, b: copy.deepcopy(b))
            spec[k] = _merge_by("name", spec.get(k) or [], v, merge)
        else:
            spec[k] = copy.deepcopy(v)


def runtime_of(trainjob: dict, objects: list[dict]) -> dict:
    """The runtime `spec.runtimeRef` names: among ``objects`` (the release), else the cluster's."""
    ref = trainjob["spec"]["runtimeRef"]
    kind = ref.get("kind", "ClusterTrainingRuntime")
    if kind == "TrainingRuntime":
        found = [
            o
            for o in objects
            if o["kind"] == kind
            and o["metadata"]["name"] == ref["name"]
            and o["metadata"].get("namespace") == trainjob["metadata"].get("namespace")
        ]
        assert found, f"TrainingRuntime {ref['name']} not found in the namespace"
        return found[0]
    runtimes = cluster_runtimes()
    assert ref["name"] in runtimes, f"ClusterTrainingRuntime {ref['name']} not installed"
    return runtimes[ref["name"]]


def resolve(trainjob: dict, objects: list[dict], uid: str = "0000-emulated-uid") -> tuple[dict, int]:
    """(the pod template of the `node` Job with PET_* injected and the JobSet labels set, numNodes).
    ``uid``: the uid the API server gave the TrainJob's JobSet (a new one per TrainJob)."""
    runtime = runtime_of(trainjob, objects)
    (rjob,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == NODE]
    pod = copy.deepcopy(rjob["template"]["spec"]["template"])
    spec = trainjob["spec"]
    for patch in spec.get("runtimePatches") or []:
        rt = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        for rpatch in (rt.get("spec") or {}).get("replicatedJobs") or []:
            if rpatch["name"] == NODE:
                _patch_pod(pod, ((rpatch.get("template") or {}).get("spec") or {}).get("template") or {})
    trainer = spec.get("trainer") or {}
    env = trainer.get("env") or []
    clash = [e["name"] for e in env if e["name"] in TORCH_ENV]
    assert not clash, f"the torch plugin rejects a TrainJob that sets {clash}"
    nodes = int(trainer.get("numNodes") or runtime["spec"].get("mlPolicy", {}).get("numNodes") or 1)
    nproc = str(trainer.get("numProcPerNode", "auto"))
    name = trainjob["metadata"]["name"]
    torch_env = [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": nproc},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    containers = pod["spec"]["containers"]
    (node,) = [c for c in containers if c["name"] == NODE]
    for key in ("image", "command", "args"):
        if key in trainer:
            node[key] = copy.deepcopy(trainer[key])
    if "resourcesPerNode" in trainer:
        node["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    node["env"] = _merge_by("name", node.get("env") or [], [*env, *torch_env], lambda a, b: copy.deepcopy(b))
    labels = pod.setdefault("metadata", {}).setdefault("labels", {})
    labels.update({JOBSET_NAME_LABEL: name, JOBSET_UID_LABEL: uid})
    return pod, nodes


def downward_fields(pod: dict) -> dict[str, str]:
    """The downward API's ``metadata.labels['k']`` / ``metadata.annotations['k']`` of a pod template."""
    meta = pod.get("metadata") or {}
    return {
        f"metadata.{kind}['{key}']": str(value)
        for kind in ("labels", "annotations")
        for key, value in (meta.get(kind) or {}).items()
    }
