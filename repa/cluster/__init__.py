"""The cluster wing: what repa does with the Kubernetes API and torchrun (docs/kubernetes.md).

- ``kube``: the chart's object names for a release, the one API-client loader, one-line API errors;
- ``status``, ``logs``: ``repa status`` / ``repa logs`` of a Helm release (TrainJob or PyTorchJob);
- ``jobs``: one eval Job per checkpoint from the chart's template (``repa watch --launch-jobs``);
- ``eval_job``: ``repa eval-job``, the watcher's Job for one checkpoint, for ``kubectl apply -f -``;
- ``launch``: ``repa torchrun``, torchrun whose exit code survives preemption.

Torch-free except ``launch`` (torchrun itself) and ``eval_job`` (the evaluation protocol's digest).
"""
