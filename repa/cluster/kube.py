"""The Kubernetes side of a repa release: the chart's object names, THE API client loader, one-line errors.

Names follow helm/repa/templates/_helpers.tpl (docs/kubernetes.md "What the release creates"):
``<fullname>`` is ``<release>-repa`` (or the release name when it already contains ``repa``; the chart's
``fullnameOverride`` is passed as ``fullname``), the trainer (TrainJob or PyTorchJob) is ``<fullname>``
cut to 50 characters, the run config is ConfigMap ``<fullname>-config`` and the eval Job template
ConfigMap ``<fullname>-eval-job``.

Every API client of repa (``repa status``, ``repa logs``, ``repa eval-job``, ``repa watch --launch-jobs``)
comes from :func:`configuration`: the in-cluster service account, else the kubeconfig as ``kubectl``
finds it (``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``; ``--context`` picks a context).
Requests are not retried by urllib3 (its default retries thrice and logs a warning each time): an API
server that does not answer is one line naming it. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KubeError",
    "ReleaseNames",
    "api_client",
    "api_error",
    "configuration",
    "current_namespace",
    "is_not_found",
    "pod_namespace",
    "served",
]

CHART_NAME = "repa"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeError(RuntimeError):
    """A Kubernetes API call failed for a reason the user must fix (one line, names the object)."""


def _label(text: str, limit: int = 63) -> str:
    return text[:limit].rstrip("-")


@dataclass(frozen=True)
class ReleaseNames:
    """The objects of one Helm release of helm/repa."""

    release: str
    fullname: str

    @classmethod
    def of(cls, release: str, fullname: str | None = None) -> ReleaseNames:
        if fullname:
            return cls(release, _label(fullname))
        name = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
        return cls(release, _label(name))

    def component(self, suffix: str) -> str:
        """``<fullname>-<suffix>`` with the prefix cut to keep a DNS label (repa.componentName)."""
        return f"{_label(self.fullname, 62 - len(suffix))}-{suffix}"

    @property
    def job(self) -> str:
        """The TrainJob / PyTorchJob (repa.jobName: room for the controllers' pod suffixes)."""
        return _label(self.fullname, 50)

    @property
    def config_map(self) -> str:
        return self.component("config")

    @property
    def eval_job_config_map(self) -> str:
        return self.component("eval-job")

    @property
    def eval_job_selector(self) -> str:
        return f"app.kubernetes.io/instance={self.release},app.kubernetes.io/component=eval"


def pod_namespace() -> str | None:
    """The namespace of the pod we run in (its service-account mount), or None outside a cluster."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _kubeconfig(kubeconfig: str | None) -> str | None:
    # $KUBECONFIG read now: the client reads it once, at import (KUBE_CONFIG_DEFAULT_LOCATION)
    return kubeconfig or os.environ.get("KUBECONFIG") or None


def current_namespace(
    default: str = "default", *, context: str | None = None, kubeconfig: str | None = None
) -> str:
    """The pod's namespace in a cluster (unless a context or kubeconfig is named), else the kubeconfig
    context's (``kubectl``'s choice), else ``default``."""
    if not (context or kubeconfig):
        found = pod_namespace()
        if found:
            return found
    try:
        from kubernetes import config

        contexts, current = config.list_kube_config_contexts(config_file=_kubeconfig(kubeconfig))
        chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
        return (chosen or {}).get("context", {}).get("namespace") or default
    except Exception:
        return default


def configuration(context: str | None = None, kubeconfig: str | None = None) -> Any:
    """A fresh ``kubernetes.client.Configuration`` (what the kubeflow SDKs take): the in-cluster service
    account when in a pod and neither ``context`` nor ``kubeconfig`` is named, else the kubeconfig."""
    from kubernetes import client, config

    conf = client.Configuration()
    in_cluster: Exception | None = None
    if not (context or kubeconfig):
        try:
            config.load_incluster_config(client_configuration=conf)
            conf.retries = False
            return conf
        except config.ConfigException as e:
            in_cluster = e
    path = _kubeconfig(kubeconfig)
    try:
        config.load_kube_config(config_file=path, context=context, client_configuration=conf)
    except Exception as e:
        where = f"kubeconfig {path or '~/.kube/config'}" + (f", context {context}" if context else "")
        why = f"not in a cluster ({in_cluster}) and no usable " if in_cluster else "no usable "
        raise KubeError(f"no Kubernetes API access: {why}{where} ({' '.join(str(e).split())})") from None
    conf.retries = False  # one attempt: a server that is down is reported, not retried with warnings
    return conf


def api_client(context: str | None = None, kubeconfig: str | None = None) -> Any:
    """``kubernetes.client.ApiClient`` of :func:`configuration`."""
    from kubernetes import client

    return client.ApiClient(configuration(context, kubeconfig))


def served(api: Any, group: str, version: str, plural: str) -> bool:
    """Whether the API server serves ``plural`` in ``group/version`` (is the CRD installed?), by API
    discovery; a 404 there means the group/version is unknown to the server."""
    from kubernetes import client

    try:
        resources = client.CustomObjectsApi(api).get_api_resources(group, version)
    except Exception as e:
        if is_not_found(e):
            return False
        raise api_error(e, f"API group {group}/{version}") from None
    return any(r.name == plural for r in (resources.resources or []))


def is_not_found(e: BaseException) -> bool:
    """HTTP 404 from the API, also when an SDK wrapped the ApiException (``raise ... from e``)."""
    while getattr(e, "status", None) is None and e.__cause__ is not None:
        e = e.__cause__
    return getattr(e, "status", None) == 404


def api_error(e: BaseException, what: str) -> KubeError:
    """One line for a failed API call on ``what`` (e.g. "trainjob ml/myrun-repa")."""
    while getattr(e, "status", None) is None and e.__cause__ is not None:  # SDKs wrap ApiException
        if _unreachable(e):
            break
        e = e.__cause__
    status = getattr(e, "status", None)
    if status is None and _unreachable(e):
        return KubeError(
            f"cannot reach the Kubernetes API server ({_reason(e)}); check --context, --kubeconfig"
        )
    if status == 404:
        return KubeError(f"{what} not found")
    if status in (401, 403):
        return KubeError(
            f"no permission to read {what} (HTTP {status}); ask for get/list on it in the namespace"
        )
    if status is not None:
        said = f"HTTP {status} {getattr(e, 'reason', '') or ''}".rstrip()
        try:  # the API server's own words (a Status), e.g. "previous terminated container ... not found"
            message = json.loads(getattr(e, "body", None) or "{}").get("message")
        except (ValueError, AttributeError):
            message = None
        return KubeError(f"{what}: API server answered {said}" + (f": {message}" if message else ""))
    return KubeError(f"{what}: {type(e).__name__}: {' '.join(str(e).split())}")


def _unreachable(e: BaseException) -> bool:
    """A connection that failed or broke (urllib3), as opposed to an answer from the server."""
    import urllib3

    return isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))


def _reason(e: BaseException) -> str:
    """``127.0.0.1:6443: [Errno 111] Connection refused`` from a urllib3 error (whose text is the repr
    of its connection pool, then the cause)."""
    text = " ".join(str(e).split())
    m = re.search(r"host='([^']*)', port=(\d+)", text)
    cause = text.rsplit(": ", 1)[-1].rstrip("')\"") if ": " in text else text
    return f"{m.group(1)}:{m.group(2)}: {cause}" if m else cause
