"""The Helm chart helm/repa, checked offline with the real Helm 4 and Helm 3 binaries.

Every profile in helm/repa/ci/ must lint strictly, render at the oldest and newest supported Kubernetes
version, and every rendered object must be valid: core kinds against Kubernetes' own schemas
(kubernetes-validate, strict), the PyTorchJob against the vendored Training Operator CRD made strict
plus the operator webhook's rules, the TrainJob and TrainingRuntime against the vendored Trainer v2.3.0
CRDs made strict plus their CEL rules, pod templates as core PodTemplates (a TrainJob's as the Trainer
controller resolves it against its runtime, tests/chart/trainjob_runtime.py). Bad values must fail with a
message that names the field.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import trainjob_runtime
import yaml
from chart_helpers import (
    CHART,
    HELMS,
    KUBE_VERSIONS,
    NAMESPACE,
    PROFILES,
    RELEASE,
    by_kind,
    eval_job_template,
    has_eval_job_template,
    load_yaml_docs,
    one,
    pod_templates,
    profile_file,
    render,
    render_text,
    run,
    template_cmd,
    tool,
    trainer_job,
)

CRD_PATH = Path(__file__).parent / "assets" / "kubeflow.org_pytorchjobs.yaml"
TRAINER_V2 = Path(__file__).parent / "assets" / "trainer-v2.3.0"
KUBEFLOW_KINDS = ("PyTorchJob", "TrainJob", "TrainingRuntime")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def profile_values(profile: str) -> dict:
    """values.yaml merged with one ci profile, as Helm merges them."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return deep_merge(defaults, yaml.safe_load(profile_file(profile).read_text()))


def backend_profiles(backend: str) -> list[str]:
    return [p for p in PROFILES if profile_values(p)["trainer"]["backend"] == backend]


PYTORCHJOB_PROFILES = backend_profiles("pytorchjob")
TRAINJOB_PROFILES = backend_profiles("trainjob")


def walk(node: Any, path: str = ""):
    """Yield (path, value) for every leaf of a JSON-like tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, node


# ------------------------------------------------------------------------------------------------
# lint and render
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize("profile", PROFILES)
def test_chart_lints_strictly(helm: str, profile: str) -> None:
    proc = run([tool(helm), "lint", "--strict", str(CHART), "-f", str(profile_file(profile))])
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("profile", PROFILES)
def test_helm3_and_helm4_render_the_same_objects(profile: str) -> None:
    assert render(profile, "helm3") == render(profile, "helm")


@pytest.mark.parametrize("profile", PROFILES)
def test_oldest_and_newest_kubernetes_render_the_same_objects(profile: str) -> None:
    """Nothing is gated on the version: what is validated at 1.28 is what a 1.33 cluster gets."""
    assert render(profile, kube_version=KUBE_VERSIONS[0]) == render(profile, kube_version=KUBE_VERSIONS[-1])


# ------------------------------------------------------------------------------------------------
# core objects against Kubernetes' schemas
# ------------------------------------------------------------------------------------------------


def validate_core(obj: dict, kube_version: str) -> None:
    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata'].get('name')} invalid at Kubernetes {kube_version}: "
            f"{'.'.join(map(str, e.path))}: {e.message}"
        ) from None


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_core_object_passes_strict_kubernetes_validation(profile: str, kube_version: str) -> None:
    docs = render(profile, kube_version=kube_version)
    core = [d for d in docs if d["kind"] not in KUBEFLOW_KINDS]
    kinds = {d["kind"] for d in core}
    assert {"ConfigMap", "ServiceAccount"} <= kinds
    for obj in core:
        validate_core(obj, kube_version)
    if has_eval_job_template(docs):
        validate_core(eval_job_template(docs), kube_version)


def test_strict_kubernetes_validation_catches_a_misspelled_field() -> None:
    """Guards the guard: the validator really is strict."""
    dep = copy.deepcopy(one(render("minimal"), "Deployment", "tensorboard"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolcy"):
        validate_core(dep, KUBE_VERSIONS[-1])


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_template_is_a_valid_core_pod_template(profile: str, kube_version: str) -> None:
    """The CRD embeds the Kubernetes 1.36 pod schema; the target cluster's own version decides."""
    for owner, template in pod_templates(render(profile, kube_version=kube_version)):
        pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            kubernetes_validate.validate(pt, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{owner}: {'.'.join(map(str, e.path))}: {e.message}") from None


# ------------------------------------------------------------------------------------------------
# PyTorchJob: vendored CRD (strict) and the operator's webhook rules
# ------------------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """additionalProperties: false on every object schema with fixed properties (structural CRD schema)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def test_vendored_crd_is_the_training_operator_v1_9_4_file() -> None:
    """shared/schemas/README.md: kubeflow/trainer v1.9.4 manifests/base/crds/kubeflow.org_pytorchjobs.yaml."""
    digest = hashlib.sha256(CRD_PATH.read_bytes()).hexdigest()
    assert digest == "8b8a8a719cc94173169290251e817f7ac2bb425c20b6c2fa813397bcf4e932ed"


@pytest.fixture(scope="module")
def pytorchjob_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["spec"]["names"]["kind"] == "PyTorchJob"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1"
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def webhook_errors(job: dict) -> list[str]:
    """The validating webhook's rules (kubeflow/training-operator release-1.9), as messages."""
    errors = []
    name = job["metadata"]["name"]
    if not (DNS1035_LABEL.match(name) and len(name) <= 63):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    specs = job["spec"]["pytorchReplicaSpecs"]
    for rtype, spec in specs.items():
        if rtype not in ("Master", "Worker"):
            errors.append(f"replica type {rtype!r}: only Master and Worker")
        containers = spec["template"]["spec"]["containers"]
        pytorch = [c for c in containers if c["name"] == "pytorch"]
        if len(pytorch) != 1 or not pytorch[0].get("image"):
            errors.append(f"{rtype}: needs one container named 'pytorch' with an image")
    if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
        errors.append("Master replicas must be 1")
    if "elasticPolicy" in job["spec"] and "Worker" not in specs:
        errors.append("elasticPolicy requires a Worker replica spec")
    if not isinstance(job["spec"].get("nprocPerNode", ""), str):
        errors.append("spec.nprocPerNode must be a string")
    return errors


def test_both_backends_are_covered_by_the_profiles() -> None:
    assert PYTORCHJOB_PROFILES and TRAINJOB_PROFILES
    assert profile_values("minimal")["trainer"]["backend"] == "trainjob"  # the chart's default


@pytest.mark.parametrize("profile", PYTORCHJOB_PROFILES)
def test_pytorchjob_passes_the_strict_crd_schema_and_webhook_rules(
    profile: str, pytorchjob_validator: jsonschema.Draft7Validator
) -> None:
    job = one(render(profile), "PyTorchJob")
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in pytorchjob_validator.iter_errors(job)
    ]
    assert errors == []
    assert webhook_errors(job) == []


def test_strict_crd_schema_rejects_a_misspelled_elastic_field(
    pytorchjob_validator: jsonschema.Draft7Validator,
) -> None:
    job = one(render("full"), "PyTorchJob")
    job["spec"]["elasticPolicy"]["maxReplica"] = 3
    job["spec"]["nprocPerNode"] = 8
    messages = " ".join(e.message for e in pytorchjob_validator.iter_errors(job))
    assert "maxReplica" in messages and "is not of type 'string'" in messages
    assert webhook_errors(job) == ["spec.nprocPerNode must be a string"]


@pytest.mark.parametrize("profile", PYTORCHJOB_PROFILES)
def test_pytorchjob_is_elastic_workers_only_running_repa_under_torchrun(profile: str) -> None:
    values = profile_values(profile)
    t = values["trainer"]
    job = one(render(profile), "PyTorchJob")
    spec = job["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == (t["replicas"] or t["maxReplicas"])
    assert worker["restartPolicy"] == t["restartPolicy"]
    ep = spec["elasticPolicy"]
    assert (ep["minReplicas"], ep["maxReplicas"]) == (t["minReplicas"], t["maxReplicas"])
    assert ep["rdzvBackend"] == "c10d" and ep["rdzvId"] and ep["maxRestarts"] == t["maxRestarts"]
    assert "standalone" not in ep and "nProcPerNode" not in ep  # PET_STANDALONE="" crashes torchrun
    assert spec["nprocPerNode"] == str(t["nprocPerNode"])
    (container,) = worker["template"]["spec"]["containers"]
    assert container["command"] == ["repa", "torchrun"]  # exits 143 on SIGTERM (repa.cluster.launch)
    assert container["args"] == ["-m", "repa", "train", "--config", "/etc/repa/config.yaml"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    grace, margin = t["terminationGracePeriodSeconds"], t["shutdownMarginSeconds"]
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(max(1, grace - margin))
    assert not any(k.startswith("PET_") for k in env)  # the operator owns those
    assert container["resources"]["limits"]["nvidia.com/gpu"] == t["gpus"]
    volumes = {v["name"]: v for v in worker["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": t["shmSizeLimit"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] == t["terminationGracePeriodSeconds"]


def test_full_profile_passes_rendezvous_options_and_nccl_knobs() -> None:
    job = one(render("full"), "PyTorchJob")
    assert job["spec"]["elasticPolicy"]["rdzvConf"] == [
        {"key": "join_timeout", "value": "900"},
        {"key": "last_call_timeout", "value": "30"},
    ]
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_DEBUG"] == "INFO"
    rp = job["spec"]["runPolicy"]
    assert rp["ttlSecondsAfterFinished"] == 604800 and rp["activeDeadlineSeconds"] == 2592000
    assert container["image"] == (
        "registry.example.com/ml/repa@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )


def test_kueue_and_gang_scheduling_admit_the_elastic_job_at_min_replicas() -> None:
    docs = render("gpu-kueue")
    job = one(docs, "PyTorchJob")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpu"
    rp = job["spec"]["runPolicy"]
    assert rp["suspend"] is True
    assert rp["schedulingPolicy"]["minAvailable"] == job["spec"]["elasticPolicy"]["minReplicas"] == 1
    assert rp["schedulingPolicy"]["queue"] == "training"
    assert rp["schedulingPolicy"]["scheduleTimeoutSeconds"] == 1800
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["schedulerName"] == "volcano"


def test_without_kueue_or_gang_the_job_starts_unsuspended_on_the_default_scheduler() -> None:
    job = one(render("full"), "PyTorchJob")
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert "suspend" not in job["spec"]["runPolicy"] and "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert "schedulerName" not in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


# ------------------------------------------------------------------------------------------------
# TrainJob (Kubeflow Trainer v2.3.0): vendored CRDs (strict), CEL and webhook rules, runtime resolution
# ------------------------------------------------------------------------------------------------

# Copied from ../shared/schemas/trainer-v2.3.0/ (kubeflow/trainer v2.3.0, commit 658725bd,
# manifests/base/crds/ and manifests/base/runtimes/torch_distributed.yaml).
TRAINER_V2_FILES = {
    "trainer.kubeflow.org_trainjobs.yaml": "a742cafc5b5582640c7e0b7467c024fc237256fbca5ba0a9f0531dfb66d64416",
    "trainer.kubeflow.org_trainingruntimes.yaml": (
        "69b8dbdf60a18e28cddcc2b8dfc4ce72a943e14b531b9389d593118faee4919f"
    ),
    "torch_distributed_runtime.yaml": "c4520df54615d481831d402e644dbeaf77a7a521eae87b2e80fd5f789aac5df2",
}


def test_vendored_trainer_files_are_the_v2_3_0_release_files() -> None:
    for name, digest in TRAINER_V2_FILES.items():
        assert hashlib.sha256((TRAINER_V2 / name).read_bytes()).hexdigest() == digest, name


@functools.cache
def trainer_v2_validator(kind: str) -> jsonschema.Draft7Validator:
    plural = {"TrainJob": "trainjobs", "TrainingRuntime": "trainingruntimes"}[kind]
    crd = yaml.safe_load((TRAINER_V2 / f"trainer.kubeflow.org_{plural}.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    validator = trainer_v2_validator(obj["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def trainer_v2_rule_errors(obj: dict) -> list[str]:
    """The CRDs' CEL rules and the Trainer webhook's checks that the chart can break (v2.3.0)."""
    errors = []
    name = obj["metadata"]["name"]
    if not (DNS1035_LABEL.match(name) and len(name) <= 63):
        errors.append(f"metadata.name {name!r}: RFC 1035 label of at most 63 characters")
    if obj["kind"] == "TrainJob":
        env = obj["spec"].get("trainer", {}).get("env", [])
        errors += [f"trainer.env sets {e['name']}" for e in env if e["name"] in trainjob_runtime.TORCH_ENV]
        if obj["spec"]["runtimeRef"].get("apiGroup", "trainer.kubeflow.org") != "trainer.kubeflow.org":
            errors.append("runtimeRef.apiGroup")
    else:
        frameworks = [k for k in ("torch", "mpi", "jax", "xgboost", "flux") if k in obj["spec"]["mlPolicy"]]
        if len(frameworks) > 1:
            errors.append(f"mlPolicy: more than one framework {frameworks}")
        rjobs = obj["spec"]["template"]["spec"]["replicatedJobs"]
        node = [r for r in rjobs if r["name"] == trainjob_runtime.NODE]
        labels = node[0]["template"].get("metadata", {}).get("labels", {}) if node else {}
        if labels.get("trainer.kubeflow.org/trainjob-ancestor-step") != "trainer":
            errors.append("replicated job `node` lacks the trainjob-ancestor-step: trainer label")
    return errors


@pytest.mark.parametrize("profile", TRAINJOB_PROFILES)
def test_trainjob_passes_the_strict_crd_schema_and_cel_rules(profile: str) -> None:
    docs = render(profile)
    objects = [d for d in docs if d["kind"] in ("TrainJob", "TrainingRuntime")]
    assert [d["kind"] for d in objects].count("TrainJob") == 1
    for obj in objects:
        assert crd_errors(obj) == [], obj["kind"]
        assert trainer_v2_rule_errors(obj) == [], obj["kind"]


def test_strict_trainjob_schema_rejects_fields_the_api_does_not_have() -> None:
    """Guards the guard, and shows why the image cannot travel in runtimePatches (ContainerPatch)."""
    job = one(render("minimal"), "TrainJob")
    job["spec"]["trainer"]["numNode"] = 2
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    patch["template"]["spec"]["template"]["spec"]["containers"][0]["image"] = "x"
    job["spec"]["trainer"]["numProcPerNode"] = "8"
    messages = " ".join(crd_errors(job))
    assert "numNode" in messages and "'image' was unexpected" in messages
    assert "is not of type 'integer'" in messages


@pytest.mark.parametrize("profile", TRAINJOB_PROFILES)
def test_trainjob_runs_repa_under_torchrun_on_a_fixed_node_count(profile: str) -> None:
    t = profile_values(profile)["trainer"]
    docs = render(profile)
    job = one(docs, "TrainJob")
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == t["maxReplicas"] == t["minReplicas"]
    assert trainer["numProcPerNode"] == int(t["nprocPerNode"])
    assert trainer["command"] == ["repa", "torchrun"]  # exits 143 after SIGTERM (repa.cluster.launch)
    assert trainer["args"] == ["-m", "repa", "train", "--config", "/etc/repa/config.yaml"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == t["gpus"]
    pod, nodes = trainjob_runtime.resolve(job, docs)
    assert nodes == t["maxReplicas"]
    (node,) = pod["spec"]["containers"]
    assert node["name"] == "node" and node["image"] == trainer["image"]
    env = {e["name"]: e.get("value") for e in node["env"]}
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["PET_NNODES"] == str(nodes) and env["PET_NPROC_PER_NODE"] == t["nprocPerNode"]
    assert env["PET_MASTER_ADDR"] == f"{job['metadata']['name']}-node-0-0.{job['metadata']['name']}"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": t["shmSizeLimit"]}
    assert pod["spec"]["terminationGracePeriodSeconds"] == t["terminationGracePeriodSeconds"]
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-repa"


@pytest.mark.parametrize("profile", PROFILES)
def test_trainer_pods_of_either_backend_carry_a_job_identity_for_the_run_lease(profile: str) -> None:
    """REPA_JOB_ID (repa.lease.job_identity): a TrainJob's from its JobSet's name and uid labels (same
    across the JobSet's restarts, new for every TrainJob), a PyTorchJob's from its namespace and name."""
    docs = render(profile)
    job = trainer_job(docs)
    name = job["metadata"]["name"]
    if job["kind"] == "TrainJob":
        pods = [trainjob_runtime.resolve(job, docs, uid=uid)[0] for uid in ("uid-a", "uid-a", "uid-b")]
        ids = []
        for pod in pods:
            (node,) = pod["spec"]["containers"]
            env = {e["name"]: e for e in node["env"]}
            ids.append(
                expand_env(
                    env["REPA_JOB_ID"]["value"],
                    {
                        v: trainjob_runtime.downward_fields(pod)[env[v]["valueFrom"]["fieldRef"]["fieldPath"]]
                        for v in ("REPA_JOBSET_NAME", "REPA_JOBSET_UID")
                    },
                )
            )
            order = [e["name"] for e in node["env"]]  # $(VAR) expands only from variables defined before
            assert order.index("REPA_JOBSET_UID") < order.index("REPA_JOB_ID")
        assert ids[0] == ids[1] == f"trainjob/{NAMESPACE}/{name}/uid-a"
        assert ids[2] == f"trainjob/{NAMESPACE}/{name}/uid-b"
    else:
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["REPA_JOB_ID"] == f"pytorchjob/{NAMESPACE}/{name}"


def expand_env(text: str, env: dict[str, str]) -> str:
    for key, value in env.items():
        text = text.replace(f"$({key})", value)
    return text


def comparable(pod: dict) -> dict:
    """A trainer pod template without what differs by backend only: container name, PET_* env, the job
    identity (REPA_JOB_ID and the JobSet labels it is made of)."""
    pod = copy.deepcopy(pod)
    for c in pod["spec"]["containers"]:
        c["name"] = "trainer"
        c["env"] = [e for e in c["env"] if not e["name"].startswith(("PET_", "REPA_JOB"))]
    labels = pod["metadata"].get("labels", {})
    for key in (trainjob_runtime.JOBSET_NAME_LABEL, trainjob_runtime.JOBSET_UID_LABEL):
        labels.pop(key, None)
    return pod


def test_trainjob_pod_is_the_pytorchjob_pod_from_the_one_pod_template() -> None:
    """runtimePatches + spec.trainer on the cluster's torch-distributed runtime rebuild the chart's pod:
    the only losses are fields a TrainJob cannot patch and whose defaults are the chart's anyway."""
    docs = render("minimal")
    trainjob_pod, _ = trainjob_runtime.resolve(one(docs, "TrainJob"), docs)
    pytorchjob = one(render("minimal", sets=("trainer.backend=pytorchjob",)), "PyTorchJob")
    expected = comparable(pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"])
    # automountServiceAccountToken: false is the ServiceAccount's own setting; IfNotPresent is the default.
    assert expected["spec"].pop("automountServiceAccountToken") is False
    accounts = {d["metadata"]["name"]: d for d in by_kind(docs, "ServiceAccount")}
    assert accounts[trainjob_pod["spec"]["serviceAccountName"]]["automountServiceAccountToken"] is False
    assert expected["spec"]["containers"][0].pop("imagePullPolicy") == "IfNotPresent"
    got = comparable(trainjob_pod)
    got["metadata"].get("labels", {}).pop("trainer.kubeflow.org/trainjob-ancestor-step", None)
    assert got == expected


def test_own_training_runtime_carries_the_whole_pod_template_gang_policy_and_kueue() -> None:
    docs = render("trainjob")
    job = one(docs, "TrainJob")
    runtime = one(docs, "TrainingRuntime")
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": runtime["metadata"]["name"],
    }
    assert "runtimePatches" not in job["spec"]
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"  # the SDK reads it
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 2, "torch": {}}
    assert runtime["spec"]["podGroupPolicy"] == {"volcano": {}}
    assert runtime["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 5}
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["schedulerName"] == "volcano"
    assert pod["priorityClassName"] == "training-high"
    (c,) = pod["containers"]
    assert (
        c["envFrom"] == [{"secretRef": {"name": "repa-s3-credentials"}}] and c["imagePullPolicy"] == "Always"
    )
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpu"
    assert job["spec"]["suspend"] is True
    assert job["spec"]["activeDeadlineSeconds"] == 2592000


@pytest.mark.parametrize("profile", PROFILES)
def test_network_policy_lets_the_trainer_pods_of_either_backend_reach_each_other(profile: str) -> None:
    docs = render(profile)
    policy = next(
        d
        for d in by_kind(docs, "NetworkPolicy")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    )
    (pod,) = [t for owner, t in pod_templates(docs) if owner.startswith(trainer_job(docs)["kind"])][:1]
    labels = pod["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (peer,) = policy["spec"]["ingress"][0]["from"]
    assert peer["podSelector"]["matchLabels"].items() <= labels.items()


# ------------------------------------------------------------------------------------------------
# names, numbers, config
# ------------------------------------------------------------------------------------------------

LONGEST_RELEASE = "r" + "x" * 52  # Helm's limit: 53 characters


@pytest.mark.parametrize(
    ("profile", "release"), [*((p, RELEASE) for p in PROFILES), ("minimal", LONGEST_RELEASE)]
)
def test_every_name_is_a_dns_label_with_room_for_operator_suffixes(profile: str, release: str) -> None:
    docs = render(profile, release=release)
    names = []
    for d in docs:
        names.append(d["metadata"]["name"])
        if d["kind"] == "PyTorchJob":
            # the operator's per-pod Service `<job>-worker-<index>` is a DNS-1035 label too
            assert DNS1035_LABEL.match(d["metadata"]["name"])
            names.append(f"{d['metadata']['name']}-worker-999")
        if d["kind"] == "TrainJob":
            # JobSet's Job `<job>-node-0` and pod hostname `<job>-node-0-<index>` (PET_MASTER_ADDR)
            assert DNS1035_LABEL.match(d["metadata"]["name"])
            names.append(f"{d['metadata']['name']}-node-0-999")
        if d["kind"] == "Service":
            assert DNS1035_LABEL.match(d["metadata"]["name"])
    if has_eval_job_template(docs):
        prefix = eval_job_template(docs)["metadata"]["generateName"]
        assert prefix.endswith("-")
        names.append(prefix + "0400000")  # the name `repa watch --launch-jobs` gives step 400,000
    for name in names:
        assert DNS1123_LABEL.match(name) and len(name) <= 63, name
    kind_names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(set(kind_names)) == len(kind_names)


EXPONENT = re.compile(r"^\s*(?:-\s+|[\w./-]+:\s+)([-+]?\d+(?:\.\d*)?[eE][-+]?\d+)\s*$", re.MULTILINE)


@pytest.mark.parametrize("profile", PROFILES)
def test_numbers_render_as_integers_never_floats_or_exponents(profile: str) -> None:
    """Helm parses values as float64: `{{ .x }}` would print 4000000 as 4e+06, so templates use int64.

    toYaml writes floats below 1e-6 in exponent form (adam_eps: 1e-08), which repa's loader accepts
    (float fields take numeric strings); an integral number in exponent form is always a bug.
    """
    text = render_text(profile)
    integral = [m for m in EXPONENT.findall(text) if float(m).is_integer()]
    assert integral == [], f"integers rendered in exponent form: {integral}"
    docs = load_yaml_docs(text)
    for d in [*docs, *([eval_job_template(docs)] if has_eval_job_template(docs) else [])]:
        if d["kind"] == "ConfigMap":
            continue  # the run config is checked below, against the values it came from
        floats = [p for p, v in walk(d) if isinstance(v, float)]
        assert floats == [], f"{d['kind']}/{d['metadata'].get('name')}: float values at {floats}"


def numeric_strings_as_floats(node: Any) -> Any:
    """PyYAML reads `1e-08` (no dot) as a string; Helm's toYaml writes tiny floats that way."""
    if isinstance(node, dict):
        return {k: numeric_strings_as_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [numeric_strings_as_floats(v) for v in node]
    if isinstance(node, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", node):
        return float(node)
    return node


@pytest.mark.parametrize("profile", PROFILES)
def test_config_map_holds_the_values_config_verbatim(profile: str) -> None:
    docs = render(profile)
    cm = one(docs, "ConfigMap", "config")
    assert cm["metadata"]["name"] == f"{pod_config_map_name(docs)}"
    rendered = numeric_strings_as_floats(yaml.safe_load(cm["data"]["config.yaml"]))
    expected = profile_values(profile)["config"]
    assert rendered == expected
    # integers stay integers (4000000, not 4e+06 or 4000000.0)
    for path, value in walk(expected):
        if isinstance(value, int) and not isinstance(value, bool):
            got = dict(walk(rendered))[path]
            assert type(got) is int, f"config.{path}: {got!r}"


def pod_config_map_name(docs: list[dict]) -> str:
    """The ConfigMap every pod mounts at /etc/repa (the first projected source)."""
    names = set()
    for _, template in pod_templates(docs):
        (vol,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
        names.add(vol["projected"]["sources"][0]["configMap"]["name"])
    (name,) = names
    return name


@pytest.mark.parametrize("profile", PROFILES)
def test_config_map_loads_with_repa_config(profile: str, tmp_path: Path) -> None:
    config = pytest.importorskip("repa.config")
    cm = one(render(profile), "ConfigMap", "config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    cfg = config.load_config(str(path))
    values = profile_values(profile)["config"]
    assert cfg.storage.run_url == values["storage"]["run_url"]
    assert cfg.data.url == values["data"]["url"]
    if profile == "full":
        assert cfg.train.max_steps == 4_000_000 and cfg.sample.cfg_scale == 1.8
        assert cfg.train.max_grad_norm == 1.0 and cfg.train.adam_eps == 1e-8


PRESET_VALUES = {
    "image": {"repository": "registry.example.com/ml/repa"},
    "config": {
        "preset": "sit-b-2-repa",
        "data": {"url": "s3://my-bucket/imagenet-256"},
        "storage": {"run_url": "s3://my-bucket/runs/b2"},
        # no preset carries reference statistics: without them the evaluator is refused (or disabled)
        "eval": {"reference_stats_url": "s3://my-bucket/refstats/VIRTUAL_imagenet256_labeled.npz"},
    },
}


@pytest.mark.parametrize("helm", HELMS)
def test_a_preset_and_the_two_storage_urls_install_without_repa_on_the_helm_machine(
    helm: str, tmp_path: Path
) -> None:
    """`config.preset` is resolved in the pod: helm needs neither repa nor torch, nor a sed pipeline."""
    values = tmp_path / "b2.yaml"
    values.write_text(yaml.safe_dump(PRESET_VALUES))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert shutil.which("repa", path=env["PATH"]) is None and shutil.which("python", path=env["PATH"]) is None
    # Helm 3.17's `install --dry-run=client` still asks a cluster for its version: `template` there.
    verb = ["install", "--dry-run=client"] if helm == "helm" else ["template"]
    cmd = [tool(helm), *verb, "b2", str(CHART), "-n", NAMESPACE, "-f", str(values)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    if helm != "helm":
        docs = load_yaml_docs(proc.stdout)
    else:
        manifest = proc.stdout[proc.stdout.index("MANIFEST:") : proc.stdout.index("NOTES:")]
        docs = load_yaml_docs(manifest.removeprefix("MANIFEST:"))
        assert "preset sit-b-2-repa" in proc.stdout[proc.stdout.index("NOTES:") :]
    cm = one(docs, "ConfigMap", "config")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == PRESET_VALUES["config"]  # preset + overrides
    assert one(docs, "TrainJob")["spec"]["trainer"]["numNodes"] == 1
    # ... and the pod's repa resolves it to the preset with the overrides.
    config = pytest.importorskip("repa.config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    assert config.load_config(path) == config.load_config(
        "sit-b-2-repa",
        [
            "data.url=s3://my-bucket/imagenet-256",
            "storage.run_url=s3://my-bucket/runs/b2",
            f"eval.reference_stats_url={PRESET_VALUES['config']['eval']['reference_stats_url']}",
        ],
    )


@pytest.mark.parametrize("helm", HELMS)
def test_a_preset_install_without_reference_statistics_fails_at_template_time_naming_the_value(
    helm: str, tmp_path: Path
) -> None:
    """No preset carries eval.reference_stats_url: the evaluator would crash-loop, so `helm template`
    refuses in one line naming the value (or the install turns the evaluator off)."""
    values = tmp_path / "b2.yaml"
    values.write_text(yaml.safe_dump(PRESET_VALUES))
    proc = run(
        template_cmd(helm, values=(str(values),), sets=("config.eval.reference_stats_url=",)), check=False
    )
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "config.eval.reference_stats_url" in error[0], proc.stderr
    assert "config.preset sit-b-2-repa" in error[0] and "evaluator.enabled=false" in error[0]
    sets = ("config.eval.reference_stats_url=", "evaluator.enabled=false")
    docs = load_yaml_docs(run(template_cmd(helm, values=(str(values),), sets=sets)).stdout)
    assert not [d for d in docs if d["metadata"]["name"].endswith(("-evaluator", "-eval-launcher"))]


@pytest.mark.parametrize(
    ("sets", "field"),
    [(["config.preset=sit-b-2-rep"], "config.preset"), (["config.train.max_step=10"], "config.train")],
)
def test_the_schema_still_checks_the_preset_name_and_the_overrides(
    sets: list[str], field: str, tmp_path
) -> None:
    values = tmp_path / "b2.yaml"
    values.write_text(yaml.safe_dump(PRESET_VALUES))
    proc = run(template_cmd(values=(str(values),), sets=tuple(sets)), check=False)
    assert proc.returncode != 0 and names_field(proc.stderr, field), proc.stderr


def test_values_schema_config_part_is_generated_from_repa_config() -> None:
    """`definitions.repaRunConfig` must equal repa.config_export.json_schema() (regenerate on drift)."""
    pytest.importorskip("repa.config")
    import update_values_schema

    text = (CHART / "values.schema.json").read_text()
    assert update_values_schema.render(json.loads(text)) == text, (
        "helm/repa/values.schema.json drifted from repa.config_export.json_schema(); "
        "run .venv/bin/python tests/chart/update_values_schema.py"
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_tensorboard_reads_the_run_folder_and_its_service_selects_it(profile: str) -> None:
    values = profile_values(profile)
    docs = render(profile)
    if not values["tensorboard"]["enabled"]:
        assert not [d for d in docs if d["metadata"]["name"].endswith("-tensorboard")]
        return
    dep = one(docs, "Deployment", "tensorboard")
    svc = one(docs, "Service", "tensorboard")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["tensorboard"]
    logdir = c["args"][c["args"].index("--logdir") + 1]
    assert logdir == values["config"]["storage"]["run_url"].rstrip("/") + "/tensorboard"
    assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
    assert svc["spec"]["type"] == "ClusterIP"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]


def test_eval_launcher_may_only_create_read_and_delete_jobs_and_is_the_only_pod_with_an_api_token() -> None:
    docs = render("full")
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["create", "get", "list", "watch", "delete"],
        },
        {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["get"]},
    ]
    (binding,) = by_kind(docs, "RoleBinding")
    launcher = one(docs, "Deployment", "eval-launcher")
    pod = launcher["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert pod["containers"][0]["args"] == ["watch", "--config", "/etc/repa/config.yaml", "--launch-jobs"]
    for owner, template in pod_templates(docs):
        token = template["spec"].get("automountServiceAccountToken")
        assert token is (owner == f"Deployment/{launcher['metadata']['name']}"), owner
    # the launcher reads its Job template from the mounted ConfigMap
    sources = next(v for v in pod["volumes"] if v["name"] == "config")["projected"]["sources"]
    assert {s["configMap"]["items"][0]["path"] for s in sources} == {"config.yaml", "eval-job.yaml"}
    # and carries the storage identity of the run (same workload-identity annotations)
    accounts = {d["metadata"]["name"]: d for d in by_kind(docs, "ServiceAccount")}
    sa = accounts[pod["serviceAccountName"]]
    assert sa["metadata"]["annotations"] == profile_values("full")["serviceAccount"]["annotations"]


def test_eval_job_template_evaluates_the_checkpoint_named_by_its_env() -> None:
    docs = render("full")
    job = eval_job_template(docs)
    spec = job["spec"]
    assert spec["ttlSecondsAfterFinished"] == 172800 and spec["backoffLimit"] == 4
    (c,) = spec["template"]["spec"]["containers"]
    assert c["command"] == ["repa"]
    assert c["args"] == [
        "eval",
        "--config",
        "/etc/repa/config.yaml",
        "--checkpoint",
        "$(REPA_CHECKPOINT_URL)",
    ]
    assert {"name": "REPA_CHECKPOINT_URL", "value": ""} in c["env"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert spec["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_watch_mode_runs_one_gpu_evaluator_and_no_launcher() -> None:
    docs = render("gpu-kueue")
    dep = one(docs, "Deployment", "evaluator")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["watch", "--config", "/etc/repa/config.yaml"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_runs_locked_down_with_writable_scratch_only(profile: str) -> None:
    for owner, template in pod_templates(render(profile)):
        spec = template["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"] and "emptyDir" in volumes["cache"], owner
        assert all("sizeLimit" in v["emptyDir"] for v in volumes.values() if "emptyDir" in v), owner
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, owner
            assert sc["capabilities"] == {"drop": ["ALL"]}, owner
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/tmp"] == "tmp" and mounts["/home/repa/.cache"] == "cache", owner
            assert mounts["/etc/repa"] == "config", owner


@pytest.mark.parametrize("profile", PROFILES)
def test_storage_credentials_come_from_a_secret_or_workload_identity_never_inline(profile: str) -> None:
    values = profile_values(profile)
    docs = render(profile)
    secret = values["storageAuth"]["existingSecret"]
    assert not by_kind(docs, "Secret")
    for owner, template in pod_templates(docs):
        spec = template["spec"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                if re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", e["name"]) and "value" in e:
                    pytest.fail(f"{owner}: {e['name']} has an inline value")
            refs = [s["secretRef"]["name"] for s in c.get("envFrom", [])]
            assert refs == ([secret] if secret else []), owner
        mounted = [v for v in spec["volumes"] if "secret" in v]
        assert [v["secret"]["secretName"] for v in mounted] == (
            [secret] if values["storageAuth"]["mountPath"] else []
        ), owner


def test_workload_identity_annotations_land_on_the_service_account() -> None:
    docs = render("gpu-kueue")
    sa = next(d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "myrun-repa")
    assert sa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "repa@example-project.iam.gserviceaccount.com"
    }
    assert sa["automountServiceAccountToken"] is False


# ------------------------------------------------------------------------------------------------
# bad values are rejected, naming the field
# ------------------------------------------------------------------------------------------------

BAD_VALUES = {
    "min_greater_than_max": (["trainer.minReplicas=3", "trainer.maxReplicas=2"], "trainer.minReplicas"),
    "missing_run_url": (["config.storage.run_url="], "config.storage.run_url"),
    "missing_data_url_key": (["config.data.url=null"], "config.data"),
    "run_url_not_a_storage_url": (["config.storage.run_url=/runs/x"], "config.storage.run_url"),
    "string_for_max_replicas": (["--set-string trainer.maxReplicas=four"], "trainer.maxReplicas"),
    "fractional_min_replicas": (["trainer.minReplicas=1.5"], "trainer.minReplicas"),
    "zero_min_replicas": (["trainer.minReplicas=0"], "trainer.minReplicas"),
    "negative_gpus": (["trainer.gpus=-1"], "trainer.gpus"),
    "string_for_gpus": (["--set-string trainer.gpus=eight"], "trainer.gpus"),
    "nproc_word": (["trainer.nprocPerNode=eight"], "trainer.nprocPerNode"),
    "more_processes_than_gpus": (["trainer.nprocPerNode=8", "trainer.gpus=4"], "trainer.nprocPerNode"),
    "replicas_outside_min_max": (["trainer.replicas=9", "trainer.maxReplicas=4"], "trainer.replicas"),
    "typo_in_chart_key": (["trainer.maxReplica=4"], "trainer"),
    "typo_in_config_key": (["config.train.max_step=10"], "config.train"),
    "string_for_config_int": (["--set-string config.train.max_steps=many"], "config.train.max_steps"),
    "unknown_evaluator_mode": (["evaluator.mode=sometimes"], "evaluator.mode"),
    "evaluator_without_reference_stats": (
        ["config.eval.reference_stats_url="],
        "config.eval.reference_stats_url",
    ),
    "empty_image_repository": (["image.repository="], "image.repository"),
    "bad_image_repository": (["image.repository=Registry/Repa"], "image.repository"),
    "preset_without_reference_stats": (
        ["config.preset=sit-b-2-repa", "config.eval.reference_stats_url="],
        "config.eval.reference_stats_url",
    ),
    "short_digest": (["image.digest=sha256:abc"], "image.digest"),
    "secret_mount_without_secret": (["storageAuth.mountPath=/var/secrets"], "storageAuth.mountPath"),
    "bad_restart_policy": (["trainer.restartPolicy=Sometimes"], "trainer.restartPolicy"),
    "unknown_backend": (["trainer.backend=mpijob"], "trainer.backend"),
    "trainjob_with_elastic_sizes": (
        ["trainer.minReplicas=1", "trainer.maxReplicas=2"],
        "trainer.backend=pytorchjob",
    ),
    "trainjob_with_replicas_other_than_the_node_count": (
        ["trainer.minReplicas=2", "trainer.maxReplicas=2", "trainer.replicas=1"],
        "trainer.replicas",
    ),
    "trainjob_with_nproc_gpu": (["trainer.nprocPerNode=gpu"], "trainer.nprocPerNode"),
    "trainjob_setting_a_torch_plugin_variable": (
        ["trainer.env[0].name=PET_NNODES", "--set-string trainer.env[0].value=2"],
        "PET_NNODES",
    ),
    "trainjob_secret_without_own_runtime": (
        ["storageAuth.existingSecret=keys"],
        "trainer.trainJob.createRuntime",
    ),
    "trainjob_gang_without_own_runtime": (["gangScheduling.enabled=true"], "trainer.trainJob.createRuntime"),
    "trainjob_priority_without_own_runtime": (
        ["trainer.priorityClassName=high"],
        "trainer.trainJob.createRuntime",
    ),
    "trainjob_bad_runtime_kind": (["trainer.trainJob.runtimeKind=Runtime"], "trainer.trainJob.runtimeKind"),
    "batch_not_divisible_by_an_elastic_world_size": (
        [
            "config.train.global_batch_size=256",
            "trainer.minReplicas=2",
            "trainer.maxReplicas=3",
            "trainer.gpus=8",
            "trainer.nprocPerNode=8",
        ],
        "config.train.global_batch_size",
    ),
}


def names_field(message: str, field: str) -> bool:
    """Helm 3 says `trainer.minReplicas: ...`, Helm 4 `at '/trainer/minReplicas'`; `fail`s the dotted name."""
    return field in message or "/" + field.replace(".", "/") in message


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_with_a_message_naming_the_field(case: str, helm: str) -> None:
    sets, field = BAD_VALUES[case]
    cmd = template_cmd(helm, values=(str(profile_file("minimal")),), sets=tuple(sets))
    proc = run(cmd, check=False)
    assert proc.returncode != 0, f"{case}: accepted"
    assert names_field(proc.stderr, field), f"{case}: {field} not named in:\n{proc.stderr}"


def test_a_release_name_that_is_no_dns_1035_label_is_rejected() -> None:
    proc = run(template_cmd(values=(str(profile_file("minimal")),), release="1run"), check=False)
    assert proc.returncode != 0 and "DNS-1035" in proc.stderr and "fullnameOverride" in proc.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_kubernetes_older_than_the_oldest_tested_version_is_refused(helm: str) -> None:
    cmd = template_cmd(helm, values=(str(profile_file("minimal")),), kube_version="1.27.9")
    proc = run(cmd, check=False)
    assert proc.returncode != 0 and ">=1.28.0-0" in proc.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_chart_defaults_alone_are_rejected_in_one_line_naming_every_required_value(helm: str) -> None:
    """No placeholder image or bucket: `helm template` of the bare chart names image.repository (and the
    image `make image` builds), config.data.url and config.storage.run_url in one line, no schema dump."""
    proc = run([tool(helm), "template", RELEASE, str(CHART)], check=False)
    assert proc.returncode != 0
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    for field in ("image.repository", "config.data.url", "config.storage.run_url"):
        assert field in error, proc.stderr
    assert "make image" in error and "localhost/repa:" in error
    assert "pattern" not in proc.stderr and "allOf" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_the_bare_chart_lints_strictly(helm: str) -> None:
    """`helm lint --strict` of the chart's own defaults: no schema error, no warning (lint renders
    leniently; `helm template` / `install` then stop at the required values above)."""
    proc = run([tool(helm), "lint", "--strict", str(CHART)])
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout
    # lint shows the template's own one-line message naming the required values (no schema regex dump)
    said = proc.stdout + proc.stderr
    assert "required values not set: image.repository" in said and "config.data.url" in said, said
    assert "Does not match pattern" not in said


# ------------------------------------------------------------------------------------------------
# values.yaml documentation, NOTES
# ------------------------------------------------------------------------------------------------


def test_every_value_is_documented_with_a_helm_docs_comment() -> None:
    """Each key has a `# --` comment above it, or sits inside a documented key's default (helm-docs)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    comment_block: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        if not stripped or stripped.startswith("- "):
            comment_block = [] if not stripped else comment_block
            continue
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment_block)
        inherited = any(doc for _, doc in stack)
        is_section = m.group(3).strip() == ""
        if not (documented or inherited or is_section):
            undocumented.append(m.group(2))
        stack.append((indent, documented))
        comment_block = []
    assert undocumented == []


def test_chart_readme_is_generated_from_values_and_lists_every_value() -> None:
    """`helm show readme` prints helm/repa/README.md: up to date with values.yaml (regenerate on drift)
    and a table row for every value, or for the documented key whose default holds it."""
    import update_chart_readme

    readme = (CHART / "README.md").read_text()
    assert update_chart_readme.render() == readme, (
        "helm/repa/README.md drifted from values.yaml / Chart.yaml; run "
        ".venv/bin/python tests/chart/update_chart_readme.py"
    )
    shown = run([tool("helm"), "show", "readme", str(CHART)]).stdout
    assert shown.strip() == readme.strip()
    rows = set(re.findall(r"^\| `([^`]+)` \|", shown, re.MULTILINE))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [key for key, _ in walk(values) if not any(key == r or key.startswith(r + ".") for r in rows)]
    assert missing == [], f"values without a README row: {missing}"
    for required in ("image.repository", "config.data.url", "config.storage.run_url"):
        assert required in rows
    assert "make image" in shown and "localhost/repa:" in shown


def test_chart_yaml_describes_the_default_backend() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    default = yaml.safe_load((CHART / "values.yaml").read_text())["trainer"]["backend"]
    assert default == "trainjob"
    description = " ".join(chart["description"].split())
    assert "TrainJob (default" in description, description
    assert "trainjob" in chart["keywords"]


def test_notes_print_this_releases_real_names() -> None:
    out = run(
        [
            tool("helm"),
            "install",
            "--dry-run=client",
            "sitxl",
            str(CHART),
            "-n",
            NAMESPACE,
            "-f",
            str(profile_file("full")),
        ]
    ).stdout
    notes = out[out.index("NOTES:") :]
    assert "kubectl get pytorchjob sit-xl-repa -n repa-ci" in notes
    assert "kubectl logs -n repa-ci -f sit-xl-repa-worker-0 -c pytorch" in notes
    assert "port-forward -n repa-ci svc/sit-xl-repa-tensorboard 6006:6006" in notes
    assert "repa eval-job --release sitxl -n repa-ci --checkpoint s3://repa-ci/runs/" in notes
    assert "| kubectl apply -f -" in notes
    assert "{{" not in notes


def test_notes_of_a_trainjob_release_follow_the_trainjob_and_its_node_pods() -> None:
    out = run(
        [
            tool("helm"),
            "install",
            "--dry-run=client",
            "myrun",
            str(CHART),
            "-n",
            NAMESPACE,
            "-f",
            str(profile_file("minimal")),
        ]
    ).stdout
    notes = out[out.index("NOTES:") :]
    assert "kubectl get trainjob myrun-repa -n repa-ci -w" in notes
    assert (
        "-l jobset.sigs.k8s.io/jobset-name=myrun-repa,jobset.sigs.k8s.io/replicatedjob-name=node -c node"
        in notes
    )
    assert "ClusterTrainingRuntime torch-distributed" in notes
    assert "pytorchjob" not in notes and "{{" not in notes


def test_notes_manual_eval_command_yields_a_valid_job_for_the_checkpoint() -> None:
    """Without repa: `kubectl set env --local ... | kubectl create` on the stored template (docs)."""
    docs = render("full")
    template = one(docs, "ConfigMap", "eval")["data"]["eval-job.yaml"]
    url = "s3://repa-ci/runs/sit-xl-2-repa-4m/checkpoints/step-0400000"
    out = run(
        [tool("kubectl"), "set", "env", "--local", "-f", "-", "-o", "yaml", f"REPA_CHECKPOINT_URL={url}"],
        input=template,
    ).stdout
    job = yaml.safe_load(out)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "REPA_CHECKPOINT_URL", "value": url} in env
    validate_core(job, KUBE_VERSIONS[-1])


def test_the_values_example_in_docs_renders_a_valid_release(tmp_path: Path) -> None:
    doc = (CHART.parents[1] / "docs" / "kubernetes.md").read_text()
    example = re.search(r"```yaml\n(# myrun\.yaml\n.*?)```", doc, re.DOTALL)
    assert example, "docs/kubernetes.md lost its myrun.yaml example"
    values = tmp_path / "myrun.yaml"
    values.write_text(example.group(1))
    docs = load_yaml_docs(run(template_cmd(values=(str(values),))).stdout)
    for obj in docs:
        if obj["kind"] != "PyTorchJob":
            validate_core(obj, KUBE_VERSIONS[-1])
    job = one(docs, "PyTorchJob")
    assert job["spec"]["elasticPolicy"]["maxReplicas"] == 4 and job["spec"]["nprocPerNode"] == "8"
