"""`repa eval-job`: print the Kubernetes Job that evaluates one checkpoint, for `kubectl apply -f -`.

    repa eval-job --release myrun -n ml --checkpoint s3://b/r/checkpoints/step-0400000 | kubectl apply -f -

The Job is exactly the one ``repa watch --launch-jobs`` creates for that checkpoint (docs/kubernetes.md
"Evaluation"): the chart's eval Job template (ConfigMap ``<fullname>-eval-job`` of ``--release``, or
``--job-template FILE``) rendered by :func:`repa.cluster.jobs.render_job` and named
``<prefix>-step-NNNNNNN-<protocol digest>`` by :func:`repa.cluster.jobs.job_name`. The name depends only on
the run, the step and the evaluation protocol, and the output on nothing else (no timestamps), so a second
``kubectl apply`` of the same checkpoint is a no-op and a Job the watcher made is not duplicated.
The run config (for the digest) is the release's ConfigMap ``<fullname>-config`` or ``--config``.

Only a checkpoint the watcher would evaluate gets a Job: one that ``repa.checkpoint.list_checkpoints``
(the watcher's listing) counts as committed. A step folder that does not exist, has no ``COMMITTED``
marker (still uploading) or is quarantined is refused with one line and exit code 3, before any Job is
printed, so a typo in the step or an upload in flight never becomes a GPU Job that fails in the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import yaml

from repa import checkpoint as ckpt
from repa import storage
from repa.cluster import jobs, kube
from repa.config import ConfigError, EvalConfig, RunConfig, add_config_arguments, load_config

__all__ = ["add_arguments", "eval_job", "refuse_unless_committed", "run"]

_STEP = re.compile(r"/checkpoints/step-(\d{7,})/?$")


def eval_job(
    cfg: RunConfig,
    template: dict[str, Any],
    checkpoint_url: str,
    namespace: str | None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """The Job manifest for ``checkpoint_url`` (a committed step folder of ``cfg.storage.run_url``).

    ``overrides`` (``--set`` of this command, already in ``cfg``) go to the container's ``repa eval`` as
    well: the Job's name carries the digest of ``cfg``, so its pod must run that very protocol, not the
    ConfigMap's alone."""
    from repa.eval.evaluate import plan_evaluation  # torch: only once the inputs are known to be fine

    cfg.require("storage.run_url", purpose="`repa eval-job`")
    run_url = cfg.storage.run_url.rstrip("/")
    m = _STEP.search(checkpoint_url)
    if not m or not checkpoint_url.rstrip("/").startswith(ckpt.checkpoints_url(run_url) + "/"):
        raise ConfigError(
            "--checkpoint",
            f"{checkpoint_url!r} is not a step folder of this run: expected "
            f"{ckpt.checkpoints_url(run_url)}/step-NNNNNNN (storage.run_url = {run_url})",
        )
    step = int(m.group(1))
    url = storage.join(ckpt.checkpoints_url(run_url), ckpt.step_dir_name(step))  # the watcher's spelling
    refuse_unless_committed(cfg.storage.locate(run_url), step)
    plan = plan_evaluation(cfg, ckpt.CheckpointSource(url, "run", step, run_url))
    args = [a for o in overrides for a in ("--set", o)]
    return jobs.JobLauncher(None, template, namespace=namespace).render(url, step, plan.digest, args)


def refuse_unless_committed(run: storage.Location, step: int) -> None:
    """CheckpointError (exit code 3) unless the watcher would evaluate step ``step`` of ``run``: the same
    listing it polls (committed = a ``COMMITTED`` marker and no ``QUARANTINED`` one); then say why."""
    committed, _ = ckpt.list_checkpoints(run)
    if any(ref.step == step for ref in committed):
        return
    folder = storage.join(ckpt.checkpoints_url(run), ckpt.step_dir_name(step))
    if not storage.exists(folder):
        latest = f"the latest committed is step {committed[-1].step}" if committed else "none is committed"
        raise ckpt.CheckpointError(f"checkpoint {folder} does not exist ({latest}); no Job printed")
    reason = ckpt.quarantine_reason(folder)
    if reason is not None:
        raise ckpt.CheckpointError(
            f"checkpoint {folder} is quarantined ({reason}); the watcher skips it, so no Job printed"
        )
    raise ckpt.CheckpointError(
        f"checkpoint {folder} is not committed (no {ckpt.MARKER} marker: still uploading, or abandoned); "
        "rerun once it is committed; no Job printed"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint", required=True, metavar="URL", help="<run_url>/checkpoints/step-NNNNNNN"
    )
    parser.add_argument(
        "--release", help="Helm release of helm/repa: its run config and eval Job template (Kubernetes API)"
    )
    parser.add_argument("--fullname", help="the release's fullnameOverride, if it set one")
    parser.add_argument("-n", "--namespace", help="namespace (default: the template's, else the context's)")
    parser.add_argument("--context", help="with --release: kubeconfig context (default: the current one)")
    parser.add_argument("--kubeconfig", metavar="PATH", help="with --release: kubeconfig file (as kubectl's)")
    parser.add_argument(
        "--job-template",
        default=None,
        metavar="PATH",
        help="eval Job template without --release (default: $REPA_EVAL_JOB_TEMPLATE, else "
        f"{jobs.DEFAULT_TEMPLATE_PATH})",
    )
    parser.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    sweep = parser.add_argument_group(
        "guidance sweep (repa.eval.sweep): ONE Indexed Job whose pods split the cells"
    )
    sweep.add_argument("--sweep", action="store_true", help="print the sweep's Indexed Job instead")
    defaults = EvalConfig()  # the watcher's sweep keys: one source of defaults
    sweep.add_argument(
        "--cfg-scale",
        default=",".join(f"{w:g}" for w in defaults.sweep_cfg_scales),
        metavar="W1,W2,...",
        help="CFG scales",
    )
    sweep.add_argument(
        "--guidance-high",
        default=",".join(f"{h:g}" for h in defaults.sweep_guidance_highs),
        metavar="H1,H2,...",
        help="interval ends",
    )
    sweep.add_argument(
        "--sweep-pods", type=int, default=defaults.sweep_pods, metavar="N", help="indices (pods) of the Job"
    )
    sweep.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help="samples per cell (sets sample.num_samples, in the Job's name and in its pods' command)",
    )
    sweep.add_argument(
        "--sample-parts",
        type=int,
        default=1,
        metavar="P",
        help="split each cell's samples into P parts too: cells x P units over the pods (default 1)",
    )


def _from_release(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any], str]:
    from kubernetes import client

    names = kube.ReleaseNames.of(args.release, args.fullname)
    namespace = args.namespace or kube.current_namespace(context=args.context, kubeconfig=args.kubeconfig)
    core = client.CoreV1Api(kube.api_client(args.context, args.kubeconfig))
    data = {}
    for cm, key in ((names.config_map, "config.yaml"), (names.eval_job_config_map, "eval-job.yaml")):
        what = f"configmap {namespace}/{cm}"
        try:
            found = core.read_namespaced_config_map(cm, namespace).data or {}
        except Exception as e:
            raise kube.api_error(e, what) from None
        if key not in found:
            raise kube.KubeError(f"{what} has no {key} (is evaluator.mode `jobs`?)")
        data[key] = found[key]
    cfg = RunConfig.from_yaml(data["config.yaml"], list(args.overrides or []))
    template = yaml.safe_load(data["eval-job.yaml"])
    return cfg, template, namespace


def run(args: argparse.Namespace) -> int:
    if args.sample_parts != 1 and not args.sweep:
        raise ConfigError("--sample-parts", "splits a guidance sweep's cells: only with --sweep")
    args.overrides = list(args.overrides or [])
    if args.num_samples is not None:
        args.overrides.append(f"sample.num_samples={args.num_samples}")
    try:
        if args.release:
            cfg, template, namespace = _from_release(args)
        else:
            cfg = load_config(args.config, list(args.overrides or []))
            path = args.job_template or os.environ.get("REPA_EVAL_JOB_TEMPLATE", jobs.DEFAULT_TEMPLATE_PATH)
            template, namespace = jobs.load_job_template(path), args.namespace
        storage.configure(cfg.storage.policy())  # the verb starts here: its config's storage timeouts
        body = eval_job(cfg, template, args.checkpoint, namespace, args.overrides)
        if args.sweep:  # the sweep's Indexed Job is rendered by repa.eval.sweep
            from repa.eval.sweep import render_sweep_job

            body = render_sweep_job(
                cfg, body, args.cfg_scale, args.guidance_high, args.sweep_pods, args.sample_parts
            )
    except (kube.KubeError, jobs.JobLaunchError) as e:
        print(f"repa eval-job: error: {e}", file=sys.stderr)
        return 2
    if args.output == "json":
        sys.stdout.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(body, sort_keys=False))
    return 0
