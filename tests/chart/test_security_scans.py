"""Security scans of what we ship to a cluster: checkov over the rendered chart (every profile, with the
PyTorchJob's worker pods and the eval-Job template unpacked so checkov sees them), the k8s/ example
overlay and both Dockerfiles; hadolint over the Dockerfiles.

A failed checkov check is accepted only if tests/chart/checkov_justifications.yaml names it, for the
component it fails on, with a written reason. checkov runs once per test session (~15 s).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trainjob_runtime
import yaml
from chart_helpers import (
    NAMESPACE,
    PROFILES,
    ROOT,
    eval_job_template,
    has_eval_job_template,
    render,
    run,
    tool,
)

JUSTIFICATIONS = Path(__file__).parent / "checkov_justifications.yaml"
DOCKERFILES = (ROOT / "docker" / "Dockerfile",)  # one image for GPU and CPU nodes


def component_of(obj: dict) -> str:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", "none")


def scan_inputs(out: Path) -> dict[str, str]:
    """Write everything checkov scans into `out`; return resource id (Kind.namespace.name) -> component."""
    components: dict[str, str] = {}

    def write(name: str, docs: list[dict]) -> None:
        (out / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
        for d in docs:
            md = d["metadata"]
            components[
                f"{d['kind']}.{md.get('namespace', 'default')}.{md.get('name', md.get('generateName'))}"
            ] = component_of(d)

    for profile in PROFILES:
        docs = render(profile)
        extra = []
        for d in docs:
            if d["kind"] == "PyTorchJob":  # checkov does not know the CRD: scan its pods as Pods
                for rtype, spec in d["spec"]["pytorchReplicaSpecs"].items():
                    t = spec["template"]
                    md = {**t["metadata"], "name": f"{d['metadata']['name']}-{rtype.lower()}"}
                    md["namespace"] = d["metadata"]["namespace"]
                    extra.append({"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": t["spec"]})
            if d["kind"] == "TrainJob":  # nor Trainer v2's: scan the pod its runtime + patches make
                t, _ = trainjob_runtime.resolve(d, docs)
                md = {**t["metadata"], "name": f"{d['metadata']['name']}-node"}
                md["namespace"] = d["metadata"]["namespace"]
                extra.append({"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": t["spec"]})
        if has_eval_job_template(docs):
            job = eval_job_template(docs)
            job["metadata"]["name"] = job["metadata"].pop("generateName") + "0400000"
            extra.append(job)
        write(f"chart-{profile}.yaml", docs + extra)
    overlay = run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / "example")]).stdout
    write("k8s-example.yaml", [d for d in yaml.safe_load_all(overlay) if d])
    for dockerfile in DOCKERFILES:
        shutil.copy(dockerfile, out / dockerfile.name)
        components[f"/{dockerfile.name}"] = "dockerfile"
    return components


@pytest.fixture(scope="session")
def checkov_failures(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """checkov's failed checks: [{check_id, name, resource, file, component}]."""
    out = tmp_path_factory.mktemp("checkov-input")
    components = scan_inputs(out)
    proc = subprocess.run(
        [
            tool("checkov"),
            "--directory",
            str(out),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin:/bin", "HOME": str(out)},
    )
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    by_name = {tuple(key.split(".")[1:3]): c for key, c in components.items() if key.count(".") >= 2}
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    assert all(r["summary"]["passed"] > 20 for r in reports), "checkov scanned (almost) nothing"
    scanned = {c["resource"].split(".FROM")[0] for r in reports for c in r["results"]["passed_checks"]}
    expected = (
        f"Pod.{NAMESPACE}.myrun-repa-worker",
        f"Pod.{NAMESPACE}.myrun-repa-node",
        f"Job.{NAMESPACE}.myrun-repa-eval-0400000",
        "/Dockerfile",
    )
    missing = [resource for resource in expected if resource not in scanned]
    assert missing == [], f"checkov did not scan {missing}"
    failures = []
    for r in reports:
        for f in r["results"]["failed_checks"]:
            resource = f["resource"]
            if r["check_type"] == "dockerfile":
                component = "dockerfile"
            else:  # graph checks name the pods of a workload `Pod.<ns>.<workload>.<label>-<value>...`
                _, ns, name = resource.split(".")[:3]
                component = by_name.get((ns, name), "unknown")
            failures.append(
                {
                    "check_id": f["check_id"],
                    "name": f["check_name"],
                    "resource": resource,
                    "file": f["file_path"],
                    "component": component,
                }
            )
    return failures


def load_justifications() -> dict[str, dict]:
    data = yaml.safe_load(JUSTIFICATIONS.read_text())
    for check_id, j in data.items():
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", check_id), check_id
        assert set(j) == {"title", "components", "reason"}, check_id
        assert len(j["reason"].split()) >= 12, (
            f"{check_id}: the reason must explain, not just name, the choice"
        )
    return data


def test_checkov_failures_are_all_justified(checkov_failures: list[dict]) -> None:
    justifications = load_justifications()
    unjustified = [
        f"{f['check_id']} ({f['name']}) on {f['resource']} [{f['component']}] in {f['file']}"
        for f in checkov_failures
        if f["check_id"] not in justifications
        or not (
            "all" in justifications[f["check_id"]]["components"]
            or f["component"] in justifications[f["check_id"]]["components"]
        )
    ]
    assert unjustified == [], "add a fix or a written justification:\n" + "\n".join(unjustified)


def test_every_checkov_justification_is_still_needed(checkov_failures: list[dict]) -> None:
    used = {f["check_id"] for f in checkov_failures}
    stale = sorted(set(load_justifications()) - used)
    assert stale == [], f"remove justifications for checks that pass now: {stale}"


def test_dockerfiles_are_hadolint_clean() -> None:
    proc = run([tool("hadolint"), "--failure-threshold", "info", *map(str, DOCKERFILES)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guards the guard: an unpinned `latest` base and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nENTRYPOINT repa\n")
    proc = run([tool("hadolint"), str(bad)], check=False)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_pinned_non_root_and_enters_through_repa(dockerfile: Path) -> None:
    lines = [ln.strip() for ln in dockerfile.read_text().splitlines()]
    args = dict(ln.split()[1].split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln)
    stages = {ln.split()[3] for ln in lines if ln.startswith("FROM ") and len(ln.split()) == 4}
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), ref) for ref in froms]
    froms = [ref for ref in froms if ref not in stages]  # `FROM env`: a stage of this file
    assert froms and all(re.search(r":\d[\w.-]*$", ref) for ref in froms), froms  # version tags, not latest
    assert len(set(froms)) == 1, "build and runtime stages share one base"
    assert lines[-2:] == ['ENTRYPOINT ["repa"]', 'CMD ["--help"]']
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users == ["USER 10001:10001"]  # numeric, so the kubelet can verify runAsNonRoot
    text = dockerfile.read_text()
    assert not re.search(r"(?i)(AWS_|SECRET|TOKEN|PASSWORD|CREDENTIAL)[A-Z_]*=", text)
    assert "ADD " not in text and "COPY . " not in text


def test_dockerignore_admits_only_the_package_sources() -> None:
    rules = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    assert rules[0] == "*"  # allow-list
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    # the package, what pyproject.toml reads, the runtime lock and what installs it (docker/install-env.sh)
    lock_files = {"requirements/lock.txt", "docker/install-env.sh", "docker/image_check.py"}
    assert allowed <= {"pyproject.toml", "README.md", "LICENSE", "repa", *lock_files}
    # everything the Dockerfiles COPY or bind-mount from the context is allowed in
    for dockerfile in DOCKERFILES:
        for ln in dockerfile.read_text().splitlines():
            if ln.startswith("COPY ") and "--from" not in ln:
                for src in ln.split()[1:-1]:
                    assert src.rstrip("/") in allowed, f"{dockerfile.name}: COPY {src} is excluded"
            for src in re.findall(r"--mount=type=bind,source=([^,\s]+)", ln):
                assert src in allowed, f"{dockerfile.name}: bind mount of {src} is excluded"
