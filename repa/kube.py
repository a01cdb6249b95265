"""The Kubernetes side of a repa release: the chart's object names, API clients, one-line API errors.

Names follow helm/repa/templates/_helpers.tpl (docs/kubernetes.md "What the release creates"):
``<fullname>`` is ``<release>-repa`` (or the release name when it already contains ``repa``; the chart's
``fullnameOverride`` is passed as ``fullname``), the trainer (TrainJob or PyTorchJob) is ``<fullname>``
cut to 50 characters, the run config is ConfigMap ``<fullname>-config`` and the eval Job template
ConfigMap ``<fullname>-eval-job``. Clients come from the in-cluster service account, else the kubeconfig
(``$KUBECONFIG``, ``~/.kube/config``), as ``kubectl`` finds it. Torch-free.
"""

from __future__ import annotations

import os
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


def current_namespace(default: str = "default") -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else ``default``."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            found = f.read().strip()
            if found:
                return found
    except OSError:
        pass
    try:
        from kubernetes import config

        _, context = config.list_kube_config_contexts()
        return (context or {}).get("context", {}).get("namespace") or default
    except Exception:
        return default


def api_client() -> Any:
    """``kubernetes.client.ApiClient`` from the in-cluster config, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException as in_cluster:
        try:
            # $KUBECONFIG read now: the client reads it once, at import (KUBE_CONFIG_DEFAULT_LOCATION)
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except Exception as e:
            raise KubeError(
                f"no Kubernetes API access: not in a cluster ({in_cluster}) and no usable kubeconfig ({e})"
            ) from None
    return client.ApiClient()


def configuration() -> Any:
    """The ``kubernetes.client.Configuration`` :func:`api_client` loads (what the kubeflow SDKs take)."""
    from kubernetes import client

    api_client()
    return client.Configuration.get_default_copy()


def is_not_found(e: BaseException) -> bool:
    """HTTP 404 from the API, also when an SDK wrapped the ApiException (``raise ... from e``)."""
    while getattr(e, "status", None) is None and e.__cause__ is not None:
        e = e.__cause__
    return getattr(e, "status", None) == 404


def api_error(e: BaseException, what: str) -> KubeError:
    """One line for a failed API call on ``what`` (e.g. "trainjob ml/myrun-repa")."""
    while getattr(e, "status", None) is None and e.__cause__ is not None:  # SDKs wrap ApiException
        e = e.__cause__
    status = getattr(e, "status", None)
    if status == 404:
        return KubeError(f"{what} not found")
    if status in (401, 403):
        return KubeError(
            f"no permission to read {what} (HTTP {status}); ask for get/list on it in the namespace"
        )
    if status is not None:
        return KubeError(f"{what}: API server answered HTTP {status} {getattr(e, 'reason', '')}".rstrip())
    return KubeError(f"{what}: {type(e).__name__}: {' '.join(str(e).split())}")
