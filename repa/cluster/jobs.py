"""One Kubernetes Job per checkpoint to evaluate (``repa watch --launch-jobs``).

The Job manifest is a template (YAML, ``kind: Job``) that the Helm chart renders into a ConfigMap and
mounts at ``/etc/repa/eval-job.yaml``. For each checkpoint the launcher

- names the Job ``<prefix>-step-NNNNNNN-<digest6>`` (DNS-1123, at most 63 characters; ``prefix`` is
  the template's ``metadata.name``, e.g. ``<release>-eval``; the digest of the evaluation protocol
  makes a changed protocol a new Job instead of a name clash with an old, finished one),
- sets the environment variables ``REPA_CHECKPOINT_URL`` and ``REPA_CHECKPOINT_STEP`` in every
  container, so the template's arguments can say ``--checkpoint $(REPA_CHECKPOINT_URL)`` (Kubernetes
  expands ``$(VAR)`` in ``command``/``args`` from the container's env; Helm leaves it alone),
- replaces ``${CHECKPOINT_URL}``, ``${CHECKPOINT_STEP}`` and ``${JOB_NAME}`` in any string,
- adds labels ``repa.io/checkpoint-step`` and ``repa.io/eval-digest`` to the Job and its pods,

and creates it with ``BatchV1Api.create_namespaced_job``. Extra arguments go after the container's own
(``--set sample.cfg_scale=1.8 --set sample.guidance_high=0.7`` for a guidance sweep's best cell), and a
rendered Job may be turned into the sweep's Indexed Job (``repa.eval.sweep.sweep_job``) before it is
created. HTTP 409 (AlreadyExists) means another watcher (or an earlier life of this one) created it:
treated as launched. ``status`` reads a Job's
conditions (``Complete`` / ``Failed``, batch/v1 JobStatus) and ``delete`` removes a failed one before a
retry under the same name. The API object is injected, so tests use a stub that records the calls.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from repa.cluster import kube

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEMPLATE_PATH",
    "JobLaunchError",
    "JobLauncher",
    "JobStatus",
    "LaunchResult",
    "batch_api",
    "job_name",
    "load_job_template",
    "render_job",
]

DEFAULT_TEMPLATE_PATH = "/etc/repa/eval-job.yaml"
MAX_NAME = 63  # DNS-1123 label: also the limit of the `job-name` label the Job controller adds
_INVALID = re.compile(r"[^a-z0-9-]+")


class JobLaunchError(RuntimeError):
    """A Job could not be rendered or created for a reason retrying will not fix (names the cause)."""


def _dns1123(text: str) -> str:
    return _INVALID.sub("-", text.lower()).strip("-")


def job_name(prefix: str, step: int, digest: str) -> str:
    """``<prefix>-step-NNNNNNN-<digest6>``, a valid DNS-1123 label of at most 63 characters."""
    suffix = f"step-{step:07d}-{_dns1123(digest)[:6]}"
    room = MAX_NAME - len(suffix) - 1
    head = _dns1123(prefix)[:room].rstrip("-") or "repa-eval"[:room]
    return f"{head}-{suffix}"


def load_job_template(path: str) -> dict[str, Any]:
    """Read and check the Job template (a YAML ``batch/v1`` Job with at least one container)."""
    try:
        with open(path, encoding="utf-8") as f:
            template = yaml.safe_load(f)
    except FileNotFoundError:
        raise JobLaunchError(
            f"job template {path} not found; mount the chart's eval-job ConfigMap there "
            "or pass --job-template"
        ) from None
    except yaml.YAMLError as e:
        raise JobLaunchError(f"job template {path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(template, dict) or template.get("kind") != "Job":
        kind = template.get("kind") if isinstance(template, dict) else type(template).__name__
        raise JobLaunchError(f"job template {path}: expected kind Job, got {kind!r}")
    if str(template.get("apiVersion", "")) != "batch/v1":
        raise JobLaunchError(
            f"job template {path}: apiVersion must be batch/v1, got {template.get('apiVersion')!r}"
        )
    containers = (((template.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    if not containers:
        raise JobLaunchError(f"job template {path}: spec.template.spec.containers is empty")
    return template


def _substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace("${" + key + "}", value)
        return node
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    return node


def render_job(
    template: dict[str, Any], *, name: str, checkpoint_url: str, step: int, digest: str
) -> dict[str, Any]:
    """The Job for one checkpoint (see the module docstring); ``template`` is not modified."""
    job = _substitute(
        copy.deepcopy(template),
        {"CHECKPOINT_URL": checkpoint_url, "CHECKPOINT_STEP": str(step), "JOB_NAME": name},
    )
    labels = {"repa.io/checkpoint-step": str(step), "repa.io/eval-digest": digest[:12]}
    meta = job.setdefault("metadata", {})
    meta.pop("generateName", None)
    meta["name"] = name
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    meta["annotations"] = {**(meta.get("annotations") or {}), "repa.io/checkpoint-url": checkpoint_url}
    pod = job["spec"]["template"]
    pod_meta = pod.setdefault("metadata", {})
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels}
    env = {"REPA_CHECKPOINT_URL": checkpoint_url, "REPA_CHECKPOINT_STEP": str(step)}
    spec = pod.setdefault("spec", {})
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            kept = [e for e in container.get("env") or [] if e.get("name") not in env]
            container["env"] = kept + [{"name": k, "value": v} for k, v in env.items()]
    return job


def batch_api() -> Any:
    """``kubernetes.client.BatchV1Api`` with the in-cluster config (a kubeconfig outside a cluster)."""
    from kubernetes import client

    try:
        return client.BatchV1Api(kube.api_client())
    except kube.KubeError as e:
        raise JobLaunchError(f"{e} (needed by --launch-jobs)") from None


@dataclass(frozen=True)
class LaunchResult:
    name: str
    namespace: str
    created: bool  # False: it already existed (HTTP 409)


class JobStatus:
    """What ``JobLauncher.status`` reports: the Job's terminal condition, still running, or gone."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSING = "missing"  # never created, deleted, or removed by ttlSecondsAfterFinished


def _field(obj: Any, name: str) -> Any:
    """A field of a kubernetes-client model (snake_case attribute) or of a plain dict (camelCase key)."""
    if isinstance(obj, dict):
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        return obj.get(camel, obj.get(name))
    return getattr(obj, name, None)


def job_status(job: Any) -> str:
    """RUNNING, SUCCEEDED or FAILED from a Job's ``status.conditions`` (``Complete``/``Failed`` = True)."""
    for condition in _field(_field(job, "status") or {}, "conditions") or []:
        if str(_field(condition, "status")) == "True":
            if _field(condition, "type") == "Complete":
                return JobStatus.SUCCEEDED
            if _field(condition, "type") == "Failed":
                return JobStatus.FAILED
    return JobStatus.RUNNING


class JobLauncher:
    """Creates evaluation Jobs from a template through an injected ``BatchV1Api``-like object."""

    def __init__(
        self,
        api: Any,
        template: dict[str, Any],
        *,
        namespace: str | None = None,
        name_prefix: str | None = None,
    ) -> None:
        self.api = api
        self.template = template
        meta = template.get("metadata") or {}
        self.namespace = namespace or meta.get("namespace") or kube.pod_namespace() or "default"
        self.name_prefix = name_prefix or meta.get("name") or str(meta.get("generateName") or "").rstrip("-")
        self.name_prefix = self.name_prefix or "repa-eval"

    def render(self, checkpoint_url: str, step: int, digest: str, args: Sequence[str] = ()) -> dict[str, Any]:
        """The Job for one checkpoint, named and in this namespace (``repa eval-job``'s manifest);
        ``args`` go after each container's own, e.g. ``--set sample.cfg_scale=1.8`` for the ``repa eval``
        of a guidance sweep's best cell."""
        name = job_name(self.name_prefix, step, digest)
        body = render_job(self.template, name=name, checkpoint_url=checkpoint_url, step=step, digest=digest)
        body.setdefault("metadata", {})["namespace"] = self.namespace
        if args:
            for container in body["spec"]["template"]["spec"]["containers"]:
                container["args"] = [*(container.get("args") or []), *args]
        return body

    def launch(self, checkpoint_url: str, step: int, digest: str, args: Sequence[str] = ()) -> LaunchResult:
        return self.create(self.render(checkpoint_url, step, digest, args))

    def create(self, body: dict[str, Any]) -> LaunchResult:
        """Create a rendered Job (:meth:`render`, or a sweep's Indexed Job made from one)."""
        name = body["metadata"]["name"]
        try:
            self.api.create_namespaced_job(namespace=self.namespace, body=body)
        except Exception as e:
            status = getattr(e, "status", None)
            if status == 409:
                log.info("job %s/%s already exists: treated as launched", self.namespace, name)
                return LaunchResult(name, self.namespace, created=False)
            if status in (401, 403):
                raise JobLaunchError(
                    f"not allowed to create job {self.namespace}/{name} (HTTP {status}); the watcher's "
                    f"ServiceAccount needs `create` on jobs.batch in namespace {self.namespace}"
                ) from e
            if status in (400, 422):
                reason = getattr(e, "body", None) or getattr(e, "reason", None) or e
                raise JobLaunchError(
                    f"job {name} rejected by the API server (HTTP {status}): {reason}"
                ) from e
            raise
        url = (body["metadata"].get("annotations") or {}).get("repa.io/checkpoint-url", "")
        log.info("created job %s/%s for %s", self.namespace, name, url)
        return LaunchResult(name, self.namespace, created=True)

    def status(self, name: str) -> str:
        """A :class:`JobStatus` value for Job ``name`` (HTTP 404: MISSING)."""
        try:
            return job_status(self.api.read_namespaced_job_status(name=name, namespace=self.namespace))
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return JobStatus.MISSING
            if getattr(e, "status", None) in (401, 403):
                raise JobLaunchError(
                    f"not allowed to read job {self.namespace}/{name} (HTTP {e.status}); the watcher's "  # type: ignore[attr-defined]
                    f"ServiceAccount needs `get` on jobs.batch in namespace {self.namespace}"
                ) from e
            raise

    def delete(self, name: str) -> None:
        """Delete Job ``name`` and (in the background) its pods; already gone is fine."""
        try:
            self.api.delete_namespaced_job(
                name=name, namespace=self.namespace, propagation_policy="Background"
            )
        except Exception as e:
            if getattr(e, "status", None) != 404:
                raise
        log.info("deleted failed job %s/%s", self.namespace, name)
