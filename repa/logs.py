"""`repa logs RELEASE [-f]`: the trainer's worker logs, through the kubeflow SDKs.

TrainJob: ``TrainerClient.get_job_logs`` (container ``node`` of node 0; ``--node`` picks another);
PyTorchJob: ``TrainingClient.get_job_logs`` (container ``pytorch`` of worker-0, the job-role master).
``-f`` follows the stream. Errors are one line (repa.status: not found, no permission).
"""

from __future__ import annotations

import argparse
import logging
import sys

from repa import kube

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release", help="Helm release of helm/repa")
    parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    parser.add_argument("--fullname", help="the release's fullnameOverride, if it set one")
    parser.add_argument("-f", "--follow", action="store_true", help="follow the log stream")
    parser.add_argument("--node", type=int, default=0, help="TrainJob node index (default 0)")


def _trainjob_logs(conf, name: str, namespace: str, follow: bool, node: int) -> None:
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    logging.getLogger("kubeflow.trainer.backends.kubernetes.backend").setLevel(logging.ERROR)
    trainer = TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=conf))
    for line in trainer.get_job_logs(name, follow=follow, step=f"node-{node}"):
        print(line.rstrip("\n"), flush=True)


def _pytorchjob_logs(conf, name: str, namespace: str, follow: bool) -> None:
    from kubeflow.training import TrainingClient

    trainer = TrainingClient(client_configuration=conf, namespace=namespace, job_kind="PyTorchJob")
    logs, _ = trainer.get_job_logs(name, follow=follow)  # follow: the SDK prints the stream itself
    for text in logs.values():
        print(text.rstrip("\n"), flush=True)


def run(args: argparse.Namespace) -> int:
    names = kube.ReleaseNames.of(args.release, args.fullname)
    namespace = args.namespace or kube.current_namespace()
    name = names.job
    try:
        conf = kube.configuration()
        try:
            _trainjob_logs(conf, name, namespace, args.follow, args.node)
        except Exception as e:
            if not kube.is_not_found(e):
                raise kube.api_error(e, f"trainjob {namespace}/{name}") from None
            try:
                _pytorchjob_logs(conf, name, namespace, args.follow)
            except Exception as e2:
                if kube.is_not_found(e2):
                    raise kube.KubeError(f"no trainjob or pytorchjob {namespace}/{name}") from None
                raise kube.api_error(e2, f"pytorchjob {namespace}/{name}") from None
    except kube.KubeError as e:
        print(f"repa logs: error: {e}", file=sys.stderr)
        return 2
    return 0
