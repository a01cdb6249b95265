"""The Helm chart helm/repa, checked offline with the real Helm 4 and Helm 3 binaries.

Every profile in helm/repa/ci/ must lint strictly, render at the oldest and newest supported Kubernetes
version, and every rendered object must be valid: core kinds against Kubernetes' own schemas
(kubernetes-validate, strict), the PyTorchJob against the vendored Training Operator CRD made strict
plus the operator webhook's rules, pod templates as core PodTemplates. Bad values must fail with a
message that names the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
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
)

CRD_PATH = Path(__file__).parent / "assets" / "kubeflow.org_pytorchjobs.yaml"
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
    core = [d for d in docs if d["kind"] != "PyTorchJob"]
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


@pytest.mark.parametrize("profile", PROFILES)
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
    job = one(render("minimal"), "PyTorchJob")
    job["spec"]["elasticPolicy"]["maxReplica"] = 3
    job["spec"]["nprocPerNode"] = 8
    messages = " ".join(e.message for e in pytorchjob_validator.iter_errors(job))
    assert "maxReplica" in messages and "is not of type 'string'" in messages
    assert webhook_errors(job) == ["spec.nprocPerNode must be a string"]


@pytest.mark.parametrize("profile", PROFILES)
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
    assert container["command"] == ["repa", "torchrun"]  # torchrun that exits 143 on SIGTERM (repa.launch)
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


def test_eval_launcher_may_only_create_and_read_jobs_and_is_the_only_pod_with_an_api_token() -> None:
    docs = render("full")
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch"]}
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
    "short_digest": (["image.digest=sha256:abc"], "image.digest"),
    "secret_mount_without_secret": (["storageAuth.mountPath=/var/secrets"], "storageAuth.mountPath"),
    "bad_restart_policy": (["trainer.restartPolicy=Sometimes"], "trainer.restartPolicy"),
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


def test_chart_defaults_alone_are_rejected_until_storage_urls_are_set() -> None:
    proc = run([tool("helm"), "template", RELEASE, str(CHART)], check=False)
    assert proc.returncode != 0
    assert names_field(proc.stderr, "config.storage.run_url") and names_field(proc.stderr, "config.data.url")


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
    assert "configmap -n repa-ci sit-xl-repa-eval-job" in notes
    assert "{{" not in notes


def test_notes_manual_eval_command_yields_a_valid_job_for_the_checkpoint() -> None:
    """The NOTES pipeline `kubectl set env --local ... | kubectl create` works on the stored template."""
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
