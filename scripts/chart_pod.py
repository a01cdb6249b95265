"""What the chart asks of the image, read from `helm template` of helm/repa: the user, the commands, the
security context and the writable (emptyDir) paths of every container that runs the repa image.

    helm template t helm/repa -f helm/repa/ci/minimal.yaml | python scripts/chart_pod.py IMAGE_REPOSITORY

Prints shell assignments for scripts/smoke-image.sh, which runs the built image with exactly these
settings, so the Dockerfile and the chart cannot drift apart unnoticed (user, entrypoint, writable paths).
"""

import shlex
import sys

import yaml


def pod_specs(doc):
    """Every pod spec in a rendered object (Deployment, Job, TrainJob, PyTorchJob, JobSet template...)."""
    if isinstance(doc, dict):
        if "containers" in doc and isinstance(doc["containers"], list):
            yield doc
        for value in doc.values():
            yield from pod_specs(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from pod_specs(value)


def main(repository: str) -> int:
    users, groups, commands, writable, ro_root, no_escalation, drops = set(), set(), set(), set(), set(), set(), set()
    for doc in yaml.safe_load_all(sys.stdin):
        for spec in pod_specs(doc):
            pod_sc = spec.get("securityContext") or {}
            empty_dirs = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
            for c in spec["containers"] + (spec.get("initContainers") or []):
                if not str(c.get("image", "")).startswith(repository):
                    continue
                sc = {**pod_sc, **(c.get("securityContext") or {})}
                users.add(sc.get("runAsUser"))
                groups.add(sc.get("runAsGroup"))
                ro_root.add(bool(sc.get("readOnlyRootFilesystem")))
                no_escalation.add(sc.get("allowPrivilegeEscalation") is False)
                drops.add(tuple((sc.get("capabilities") or {}).get("drop") or ()))
                commands.add((c.get("command") or ["<entrypoint>"])[0])
                writable |= {m["mountPath"] for m in c.get("volumeMounts") or [] if m["name"] in empty_dirs}
    if not users:
        print(f"chart_pod.py: no container in the rendered chart runs {repository}", file=sys.stderr)
        return 1
    for name, values in (("user", users), ("group", groups), ("read-only root", ro_root)):
        if len(values) != 1:
            print(f"chart_pod.py: the chart's containers disagree on the {name}: {sorted(values, key=str)}", file=sys.stderr)
            return 1
    out = {
        "CHART_UID": users.pop(),
        "CHART_GID": groups.pop(),
        "CHART_READ_ONLY_ROOT": int(ro_root.pop()),
        "CHART_NO_NEW_PRIVILEGES": int(all(no_escalation)),
        "CHART_DROP_ALL": int(all("ALL" in d for d in drops)),
        "CHART_COMMANDS": " ".join(sorted(commands)),
        "CHART_WRITABLE": " ".join(sorted(writable)),
    }
    for key, value in out.items():
        print(f"{key}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
