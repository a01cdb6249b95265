"""A small fake Kubernetes API server on 127.0.0.1: just the GET endpoints the kubeflow SDKs and
`repa status` / `repa logs` call, backed by a dict. Not a cluster: no watches, no writes.

    with FakeKube() as kube:
        kube.add(obj)                                  # any object with apiVersion/kind/metadata
        kube.logs[("ns", "pod", "container")] = "..."   # pod logs
        kube.forbidden.add("/apis/trainer.kubeflow.org")  # 403 for paths under a prefix
        kube.served.discard("trainer.kubeflow.org/v1alpha1")  # as if that CRD were not installed
        kube.previous_logs[("ns", "pod", "container")] = "..."  # the terminated container's (--previous)
        cfg = kube.configuration()                     # kubernetes.client.Configuration for the SDKs

Paths follow the Kubernetes REST layout (/api/v1/..., /apis/<group>/<version>/[namespaces/<ns>/]<plural>);
list calls honour `labelSelector` with `k=v`, `k!=v`, `k in (a,b)` and `k` clauses; API discovery
(`/apis/<group>/<version>`) lists the resources of the served group/versions (`served`), and any path of a
group/version that is not served is a plain-text 404, as a real API server answers for a CRD that is not
installed. Pod logs honour `tailLines` and `previous`.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PLURALS = {
    "Pod": "pods",
    "ConfigMap": "configmaps",
    "Job": "jobs",
    "PyTorchJob": "pytorchjobs",
    "TrainJob": "trainjobs",
    "TrainingRuntime": "trainingruntimes",
    "ClusterTrainingRuntime": "clustertrainingruntimes",
    "Event": "events",
}
# The custom resources of the two Kubeflow APIs, by group/version (what their CRDs install).
CRD_GROUPS = {
    "trainer.kubeflow.org/v1alpha1": ("TrainJob", "TrainingRuntime", "ClusterTrainingRuntime"),
    "kubeflow.org/v1": ("PyTorchJob",),
}
_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>log|status))?$"
)


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for clause in re.split(r",(?![^()]*\))", selector or ""):
        clause = clause.strip()
        if not clause:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+in\s+\(([^)]*)\)", clause):
            if labels.get(m.group(1)) not in [v.strip() for v in m.group(2).split(",")]:
                return False
        elif "!=" in clause:
            k, v = clause.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in clause:
            k, v = clause.split("=", 1)
            if labels.get(k.strip()) != v.strip().lstrip("="):
                return False
        elif clause not in labels:
            return False
    return True


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict] = {}  # (plural, namespace, name)
        self.logs: dict[tuple[str, str, str], str] = {}
        self.forbidden: set[str] = set()
        self.previous_logs: dict[tuple[str, str, str], str] = {}
        self.served: set[str] = set(CRD_GROUPS)  # the custom group/versions whose CRDs are installed
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": reason,
                        "message": message,
                        "code": code,
                    },
                )

            def do_GET(self) -> None:
                url = urlparse(self.path)
                fake.requests.append(self.path)
                if any(url.path.startswith(p) for p in fake.forbidden):
                    return self._status(403, "Forbidden", f"forbidden: {url.path}")
                group_version = re.match(r"^/apis/([^/]+/[^/]+)(/|$)", url.path)
                if group_version and group_version.group(1) not in CRD_GROUPS:
                    group_version = None  # built-in groups (batch/v1, ...) are always served
                if group_version and group_version.group(1) not in fake.served:
                    return self._send(404, "404 page not found\n", "text/plain")  # CRD not installed
                if group_version and url.path.rstrip("/") == f"/apis/{group_version.group(1)}":
                    return self._send(200, fake.discovery(group_version.group(1)))
                m = _PATH.match(url.path)
                if not m:
                    return self._status(404, "NotFound", f"no route {url.path}")
                query = parse_qs(url.query)
                plural, ns, name, sub = m["plural"], m["ns"], m["name"], m["sub"]
                if name is None:
                    selector = query.get("labelSelector", [""])[0]
                    items = [
                        o
                        for (p, n, _), o in sorted(fake.objects.items(), key=lambda kv: str(kv[0]))
                        if p == plural
                        and (ns is None or n == ns)
                        and _selector_matches(selector, o["metadata"].get("labels") or {})
                    ]
                    return self._send(
                        200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}
                    )
                obj = fake.objects.get((plural, ns, name))
                if obj is None:
                    return self._status(404, "NotFound", f'{plural} "{name}" not found')
                if sub == "log":
                    container = query.get("container", [""])[0]
                    previous = query.get("previous", ["false"])[0].lower() == "true"  # the client sends True
                    text = (fake.previous_logs if previous else fake.logs).get((ns, name, container))
                    if text is None and previous:
                        return self._status(
                            400,
                            "BadRequest",
                            f'previous terminated container "{container}" in pod "{name}" not found',
                        )
                    if text is None:
                        return self._status(400, "BadRequest", f"container {container} is not valid")
                    if "tailLines" in query:
                        lines = text.splitlines(keepends=True)
                        tail = int(query["tailLines"][0])
                        text = "".join(lines[len(lines) - tail :] if tail else [])
                    return self._send(200, text, "text/plain")
                return self._send(200, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def discovery(self, group_version: str) -> dict:
        """The APIResourceList of a served custom group/version."""
        resources = [
            {
                "name": PLURALS[kind],
                "singularName": "",
                "namespaced": True,
                "kind": kind,
                "verbs": ["get", "list"],
            }
            for kind in CRD_GROUPS[group_version]
        ]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    def add(self, obj: dict) -> dict:
        md = obj["metadata"]
        self.objects[(PLURALS[obj["kind"]], md.get("namespace"), md["name"])] = obj
        return obj

    def configuration(self) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    def kubeconfig(self, path: Any, namespace: str) -> str:
        """A kubeconfig file pointing at this server (for code that loads one, like kubectl)."""
        import yaml

        text = yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
                ],
                "current-context": "fake",
            }
        )
        path.write_text(text)
        return str(path)

    def __enter__(self) -> FakeKube:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
