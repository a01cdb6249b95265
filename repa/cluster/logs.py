"""`repa logs RELEASE [-f] [--tail N] [--since 5m] [--previous]`: a trainer worker's log, as kubectl has it.

The pod: TrainJob, container ``node`` of node ``--node`` (default 0; JobSet labels
``jobset.sigs.k8s.io/jobset-name``, ``replicatedjob-name=node`` and the Job completion index); PyTorchJob,
container ``pytorch`` of Worker ``--node`` (labels ``training.kubeflow.org/job-name``,
``replica-type=worker``, ``replica-index``). The newest such pod: a JobSet restart or the operator may
have replaced it.
The log comes from ``CoreV1Api.read_namespaced_pod_log`` (what ``kubectl logs`` calls) rather than the
kubeflow SDKs' ``get_job_logs``, which take none of ``--tail``, ``--since``, ``--previous``: those, ``-f``,
``--context``, ``--kubeconfig`` and ``-n`` have kubectl's meanings. Errors are one line, exit code 2
(repa.cluster.status: the CRD not installed, no such release, no permission, an API server that is down).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from repa.cluster import kube
from repa.cluster.status import add_cluster_arguments, trainer_kind

__all__ = ["add_arguments", "run", "since_seconds", "worker_pod"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def since_seconds(text: str) -> int:
    """kubectl's ``--since`` (a Go duration: ``30s``, ``5m``, ``1h30m``) in whole seconds, at least 1."""
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"--since {text!r}: expected a duration such as 30s, 5m or 1h30m")
    return max(1, int(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("-f", "--follow", action="store_true", help="follow the log stream")
    parser.add_argument(
        "--node", type=int, default=0, help="TrainJob node / PyTorchJob worker index (default 0)"
    )
    parser.add_argument(
        "--tail", type=int, default=-1, metavar="N", help="only the last N lines (default -1: all)"
    )
    parser.add_argument(
        "--since", type=since_seconds, metavar="DURATION", help="only lines newer than this, e.g. 5m or 1h"
    )
    parser.add_argument(
        "-p",
        "--previous",
        action="store_true",
        help="the log of the previous, terminated container of the pod (after a restart)",
    )


def worker_pod(core: Any, kind: str, name: str, namespace: str, node: int) -> tuple[str, str]:
    """``(pod name, container)`` of node/worker ``node`` of the trainer ``namespace/name``."""
    if kind == "TrainJob":
        selector = (
            f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
            f"batch.kubernetes.io/job-completion-index={node}"
        )
        container, what = "node", f"node {node}"
    else:
        selector = (
            f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=worker,"
            f"training.kubeflow.org/replica-index={node}"
        )
        container, what = "pytorch", f"worker {node}"
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    except Exception as e:
        raise kube.api_error(e, f"pods of {kind.lower()} {namespace}/{name}") from None
    if not pods:
        raise kube.KubeError(
            f"{kind.lower()} {namespace}/{name} has no pod for {what} (not started yet, or no such "
            f"{'node' if kind == 'TrainJob' else 'worker'}): see `repa status`"
        )
    newest = max(pods, key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))
    return newest.metadata.name, container


def run(args: argparse.Namespace) -> int:
    from kubernetes import client

    names = kube.ReleaseNames.of(args.release, args.fullname)
    namespace = args.namespace or kube.current_namespace(context=args.context, kubeconfig=args.kubeconfig)
    name = names.job
    try:
        conf = kube.configuration(args.context, args.kubeconfig)
        kind = trainer_kind(conf, name, namespace)
        core = client.CoreV1Api(client.ApiClient(conf))
        pod, container = worker_pod(core, kind, name, namespace, args.node)
        options: dict[str, Any] = {"container": container, "follow": args.follow, "previous": args.previous}
        if args.tail >= 0:
            options["tail_lines"] = args.tail
        if args.since:
            options["since_seconds"] = args.since
        try:
            response = core.read_namespaced_pod_log(pod, namespace, _preload_content=False, **options)
            for chunk in response.stream(64 * 1024):
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        except Exception as e:
            raise kube.api_error(e, f"log of pod {namespace}/{pod} container {container}") from None
    except kube.KubeError as e:
        print(f"repa logs: error: {e}", file=sys.stderr)
        return 2
    return 0
