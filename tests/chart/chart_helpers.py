"""Helpers of the Kubernetes packaging tests: tool paths, cached `helm template` renders, object lookup.

A plain module (not conftest.py), so test modules can import it by name.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import trainjob_runtime
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "repa"
PROFILES = ("minimal", "full", "gpu-kueue", "trainjob")
# Oldest and newest Kubernetes the chart supports (kubernetes-validate bundles schemas 1.25-1.37;
# kubectl v1.33 is the newest client installed).
KUBE_VERSIONS = ("1.28.0", "1.33.0")
NAMESPACE = "repa-ci"
RELEASE = "myrun"
HELMS = ("helm", "helm3")  # Helm 4.1.4 and Helm 3.17.2
TOOLS = ("helm", "helm3", "kubectl", "hadolint", "checkov", "kubernetes-validate")


def bin_dir() -> Path:
    return Path(sys.executable).parent


def tool(name: str) -> str:
    """Absolute path of a tool installed by scripts/install-tools.sh into the venv's bin/."""
    path = bin_dir() / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not installed; run scripts/install-tools.sh")
    return found


def run(cmd: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a tool; on failure show its stderr (the part that names the bad field)."""
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}\n{proc.stdout[-2000:]}"
        )
    return proc


def profile_file(profile: str) -> Path:
    return CHART / "ci" / f"{profile}.yaml"


def template_cmd(
    helm: str = "helm",
    *,
    values: tuple[str, ...] = (),
    sets: tuple[str, ...] = (),
    kube_version: str = KUBE_VERSIONS[-1],
    release: str = RELEASE,
) -> list[str]:
    cmd = [
        tool(helm),
        "template",
        release,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        kube_version,
        "--api-versions",
        "kubeflow.org/v1/PyTorchJob",
        "--api-versions",
        "trainer.kubeflow.org/v1alpha1/TrainJob",
    ]
    for v in values:
        cmd += ["-f", v]
    for s in sets:
        cmd += ["--set", s] if not s.startswith("--") else s.split(" ", 1)
    return cmd


@functools.cache
def render_text(
    profile: str,
    helm: str = "helm",
    kube_version: str = KUBE_VERSIONS[-1],
    sets: tuple[str, ...] = (),
    release: str = RELEASE,
) -> str:
    cmd = template_cmd(
        helm, values=(str(profile_file(profile)),), sets=sets, kube_version=kube_version, release=release
    )
    return run(cmd).stdout


def render(profile: str, helm: str = "helm", kube_version: str = KUBE_VERSIONS[-1], **kw: Any) -> list[dict]:
    """The rendered objects of one profile (fresh copies: tests may mutate them)."""
    return [d for d in yaml.safe_load_all(render_text(profile, helm, kube_version, **kw)) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [
        d
        for d in by_kind(docs, kind)
        if component is None
        or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} (component={component}), got {len(found)}"
    return found[0]


def trainer_job(docs: list[dict]) -> dict:
    """The training object of a release: its TrainJob or PyTorchJob."""
    (job,) = [d for d in docs if d["kind"] in ("TrainJob", "PyTorchJob")]
    return job


def has_eval_job_template(docs: list[dict]) -> bool:
    return any(d["kind"] == "ConfigMap" and "eval-job.yaml" in d.get("data", {}) for d in docs)


def eval_job_template(docs: list[dict]) -> dict:
    """The eval Job manifest stored in ConfigMap <fullname>-eval-job (mode `jobs`)."""
    cm = one(docs, "ConfigMap", "eval")
    return yaml.safe_load(cm["data"]["eval-job.yaml"])


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(owner description, PodTemplateSpec) for every workload, including the eval Job template."""
    out: list[tuple[str, dict]] = []
    for d in docs:
        kind, name = d["kind"], d["metadata"].get("name")
        if kind in ("Deployment", "Job"):
            out.append((f"{kind}/{name}", d["spec"]["template"]))
        elif kind == "PyTorchJob":
            for rtype, spec in d["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"PyTorchJob/{name}/{rtype}", spec["template"]))
        elif kind == "TrainJob":  # the pod the Trainer controller makes of it (runtime + patches + trainer)
            out.append((f"TrainJob/{name}/node", trainjob_runtime.resolve(d, docs)[0]))
        elif kind == "TrainingRuntime":
            for rjob in d["spec"]["template"]["spec"]["replicatedJobs"]:
                out.append((f"TrainingRuntime/{name}/{rjob['name']}", rjob["template"]["spec"]["template"]))
        elif kind == "ConfigMap" and "eval-job.yaml" in d.get("data", {}):
            job = yaml.safe_load(d["data"]["eval-job.yaml"])
            out.append((f"ConfigMap/{name}/eval-job.yaml", job["spec"]["template"]))
    return out


def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]
