"""The plain manifests in k8s/ (kustomize base + example overlay), rendered with the real kubectl.

They must render, validate strictly as core Kubernetes objects at the oldest and newest supported
versions, keep their cross-field promises (one Job name per checkpoint, worker count = completions,
TensorBoard reads the configured run), and share the chart's pod spec, so the two ways of deploying
repa cannot drift apart.
"""

from __future__ import annotations

import copy
import functools
import re

import kubernetes_validate
import pytest
import yaml
from chart_helpers import KUBE_VERSIONS, ROOT, eval_job_template, load_yaml_docs, one, run, template_cmd, tool

K8S = ROOT / "k8s"
TARGETS = {"base": K8S, "example": K8S / "overlays" / "example"}


@functools.cache
def kustomize_text(target: str) -> str:
    return run([tool("kubectl"), "kustomize", str(TARGETS[target])]).stdout


def kustomize(target: str) -> list[dict]:
    return load_yaml_docs(kustomize_text(target))


def run_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", "config")["data"]["config.yaml"])


def container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_value(c: dict, name: str) -> str:
    (value,) = [e["value"] for e in c["env"] if e["name"] == name]
    return value


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_kustomization_renders_objects_valid_at_every_supported_version(
    target: str, kube_version: str
) -> None:
    docs = kustomize(target)
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "ServiceAccount",
        "NetworkPolicy",
        "Deployment",
        "Service",
        "Job",
    }
    for obj in docs:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}") from None


def test_example_overlay_rewrites_every_config_reference_to_its_generated_config_map() -> None:
    docs = kustomize("example")
    cm = one(docs, "ConfigMap", "config")
    assert re.fullmatch(r"repa-config-[a-z0-9]{10}", cm["metadata"]["name"])  # content hash suffix
    for d in docs:
        assert d["metadata"]["namespace"] == "repa-example"
        if d["kind"] in ("Deployment", "Job"):
            (vol,) = [v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
            assert vol["projected"]["sources"][0]["configMap"]["name"] == cm["metadata"]["name"]
            assert container(d)["image"] == "registry.example.com/ml/repa:0.1.0"
    assert run_config(docs)["model"]["name"] == "SiT-B/2"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_run_configs_load_with_repa_config(target: str, tmp_path) -> None:
    config = pytest.importorskip("repa.config")
    path = tmp_path / "config.yaml"
    path.write_text(one(kustomize(target), "ConfigMap", "config")["data"]["config.yaml"])
    cfg = config.load_config(str(path))
    assert cfg.storage.run_url.startswith("s3://") and cfg.data.url.startswith("s3://")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_eval_job_is_named_after_the_checkpoint_it_evaluates(target: str) -> None:
    docs = kustomize(target)
    job = one(docs, "Job", "eval")
    c = container(job)
    url = env_value(c, "REPA_CHECKPOINT_URL")
    step = re.fullmatch(r".*/checkpoints/step-(\d{7})", url)
    assert step, url
    assert job["metadata"]["name"] == f"repa-eval-{step.group(1)}"
    assert url.startswith(run_config(docs)["storage"]["run_url"].rstrip("/") + "/checkpoints/")
    assert c["args"] == [
        "eval",
        "--config",
        "/etc/repa/config.yaml",
        "--checkpoint",
        "$(REPA_CHECKPOINT_URL)",
    ]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_the_checkpoint_is_one_value_and_no_object_of_its_own_is_applied() -> None:
    """`kubectl apply -k`: the overlay sets only ConfigMap repa-eval-checkpoint's url (local-only, not
    applied); the Job's name and REPA_CHECKPOINT_URL follow it, by field name, not by list index."""
    overlay = yaml.safe_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    assert not [
        p
        for p in overlay.get("patches", [])
        if p["target"]["kind"] == "Job" and "eval" in p["target"].get("name", "")
    ]
    (generator,) = [g for g in overlay["configMapGenerator"] if g["name"] == "repa-eval-checkpoint"]
    (literal,) = generator["literals"]
    url = literal.removeprefix("url=")
    docs = kustomize("example")
    assert not [d for d in docs if d["metadata"]["name"] == "repa-eval-checkpoint"]
    job = one(docs, "Job", "eval")
    assert env_value(container(job), "REPA_CHECKPOINT_URL") == url
    assert job["metadata"]["name"] == "repa-eval-" + url.rsplit("/step-", 1)[1]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_prepare_job_is_indexed_with_worker_count_equal_to_completions(target: str) -> None:
    job = one(kustomize(target), "Job", "prepare")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    c = container(job)
    assert int(env_value(c, "REPA_WORKER_COUNT")) == spec["completions"] == spec["parallelism"]
    assert c["command"] == ["repa"] and c["args"][:3] == ["prepare", "images", "$(SOURCE_URL)"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_tensorboard_reads_the_configured_run(target: str) -> None:
    docs = kustomize(target)
    args = container(one(docs, "Deployment", "tensorboard"))["args"]
    assert (
        args[args.index("--logdir") + 1]
        == run_config(docs)["storage"]["run_url"].rstrip("/") + "/tensorboard"
    )


# ------------------------------------------------------------------------------------------------
# parity with the chart's single pod-spec helper
# ------------------------------------------------------------------------------------------------


@functools.cache
def chart_like_base_text() -> str:
    """The chart rendered with the settings the plain base hard-codes."""
    base = yaml.safe_load((K8S / "base" / "config.yaml").read_text())
    sets = (
        "fullnameOverride=repa",
        "image.repository=ghcr.io/example/repa",  # the base's placeholder image (overlays set their own)
        "trainer.backend=pytorchjob",  # the base's Secret needs envFrom; the trainer is not compared
        "serviceAccount.name=repa",
        "storageAuth.existingSecret=repa-storage",
        f"config.data.url={base['data']['url']}",
        f"config.storage.run_url={base['storage']['run_url']}",
        f"config.eval.reference_stats_url={base['eval']['reference_stats_url']}",
    )
    return run(template_cmd(sets=sets)).stdout


def chart_like_base() -> list[dict]:
    return load_yaml_docs(chart_like_base_text())


def normalized_pod_spec(template: dict) -> dict:
    """The pod spec without what legitimately differs: checkpoint URL value, Secret optionality, order."""
    spec = copy.deepcopy(template["spec"])
    for c in spec["containers"]:
        for e in c.get("env", []):
            if e["name"] == "REPA_CHECKPOINT_URL":
                e["value"] = "<checkpoint>"
        for src in c.get("envFrom", []):
            src["secretRef"].pop("optional", None)
        c["volumeMounts"] = sorted(c["volumeMounts"], key=lambda m: m["name"])
    spec["volumes"] = sorted(spec["volumes"], key=lambda v: v["name"])
    return spec


def test_plain_eval_job_has_the_chart_eval_job_pod_spec() -> None:
    chart_job = eval_job_template(chart_like_base())
    plain_job = one(load_yaml_docs((K8S / "base" / "eval-job.yaml").read_text()), "Job")
    assert normalized_pod_spec(plain_job["spec"]["template"]) == normalized_pod_spec(
        chart_job["spec"]["template"]
    )
    for key in ("backoffLimit", "ttlSecondsAfterFinished"):
        assert plain_job["spec"][key] == chart_job["spec"][key], key


def test_plain_tensorboard_has_the_chart_tensorboard_pod_spec() -> None:
    chart_dep = one(chart_like_base(), "Deployment", "tensorboard")
    plain_dep = one(load_yaml_docs((K8S / "base" / "tensorboard.yaml").read_text()), "Deployment")
    assert normalized_pod_spec(plain_dep["spec"]["template"]) == normalized_pod_spec(
        chart_dep["spec"]["template"]
    )
