"""`repa torchrun ARGS`: torchrun (``torch.distributed.run``) whose exit code survives preemption.

On Kubernetes torchrun is PID 1 of the worker container, so the kubelet's SIGTERM reaches it first. The
elastic agent forwards the signal to the workers, waits up to ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``
seconds (default 30; the Helm chart derives it from ``trainer.terminationGracePeriodSeconds``) for them
to commit their preemption checkpoint, SIGKILLs what is left, and then raises ``SignalException`` out of
``torch.distributed.run.main``: a traceback and exit code **1**. With the chart's documented
``restartPolicy: ExitCode`` 1 means "fail the job permanently" (Kubeflow Training Operator: codes
1-127 are permanent, >= 128 retryable), so a preempted job would never come back.

This wrapper runs the same ``main`` in-process and turns that ``SignalException`` into
``128 + signal`` (143 for SIGTERM) with a one-line message, so ``ExitCode`` recreates the pod and
``OnFailure`` restarts it. When workers fail, the exit code is the first failed worker's own
(``repa.cli.EXIT_CODES``; 1 if it died by a signal) with a one-line summary instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its usual flags and the training command); return the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        torchrun(args)
    except SignalException as e:
        code = 128 + int(e.sigval)
        print(
            f"repa torchrun: stopped by signal {e.sigval.name}: workers were told to commit a checkpoint; "
            f"exit code {code}",
            file=sys.stderr,
        )
        return code
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        summary = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in failures)
        print(f"repa torchrun: workers failed ({summary}); their own messages are above", file=sys.stderr)
        # A worker's own code (2 config, 4 storage, 5 lease...) says more than torchrun's blanket 1.
        return next((f.exitcode for _, f in failures if f.exitcode > 0), 1)
    except SystemExit as e:  # --help, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
