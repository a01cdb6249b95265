"""Collectives and host syncs per training step of `repa train`, counted on CPU with gloo (2 processes).

Each count is the difference between two runs of the tiny toy-cpu config (``--short`` and ``--long``
steps, fresh run folders, one checkpoint at the end, no TensorBoard) divided by the difference of their
steps, so start-up, resume and the final save cancel out and what remains is the steady-state step. It
drives the CLI (``repa.cli.main(["train", ...])``), so the same script measures any version of the code:

    .venv/bin/python benchmarks/collectives.py                        # this checkout (PYTHONPATH=$PWD)
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/collectives.py   # another version
    .venv/bin/python benchmarks/collectives.py --smoke                # CI: 2 and 4 steps

What is counted, in each of the 2 processes:

- **collectives**: calls of ``torch.distributed`` collectives (all_reduce, broadcast, barrier,
  all_gather[_object], broadcast_object_list, ...) made from outside torch. DDP's bucketed gradient
  all-reduce runs inside its C++ reducer and is not counted (it is the same in every version).
- **host syncs**: ``Tensor.item/tolist/numpy/__bool__/__float__/__int__`` called from repa's own code:
  the points where the Python loop waits for a value. On CPU no device is waited for; on a GPU each is a
  device-to-host sync that stops the CPU from queueing the next kernels (``--cuda-syncs`` counts those
  with ``torch.cuda.set_sync_debug_mode`` on one GPU, all of torch's included).

Prints the per-step figures of each rank (docs/benchmarks.md, "Collectives and host syncs per step").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

try:  # the tests' synthetic ImageNet tree and tiny run (tests/support/ in later checkouts)
    from tests.support.datasets import make_imagenet_tree
    from tests.support.tiny_runs import TINY_TRAIN_SETS
except ImportError:
    from tests.support.datasets import make_imagenet_tree
    from tests.support.tiny_runs import TINY_TRAIN_SETS

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "barrier",
    "all_gather",
    "all_gather_object",
    "broadcast_object_list",
    "gather",
    "scatter",
    "reduce",
    "reduce_scatter",
    "all_to_all",
)
SYNCS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
# the tiny run of tests/integration/test_train.py, with one checkpoint (at the end) and no TensorBoard
QUIET = ["log.tensorboard=false", "log.every_steps=1000000", "checkpoint.every_steps=1000000"]


def _install_counters(counts: collections.Counter, repa_dir: str) -> None:
    """Wrap the collectives of ``torch.distributed`` and the syncing Tensor methods with counters."""
    import torch.distributed as dist

    torch_dir = os.path.dirname(torch.__file__)
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def collective(*args, _real=real, _name=name, **kwargs):
            if not sys._getframe(1).f_code.co_filename.startswith(torch_dir):
                counts[f"collective:{_name}"] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, collective)
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def sync(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(repa_dir):
                where = os.path.relpath(caller.f_code.co_filename, os.path.dirname(repa_dir))
                counts[f"sync:{_name} in {where}:{caller.f_code.co_name}"] += 1
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, sync)


def _worker(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import repa
    from repa.cli import main

    counts: collections.Counter = collections.Counter()
    _install_counters(counts, os.path.dirname(repa.__file__))
    code = main(argv)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"code": code, "counts": counts}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_argv(data_url: str, run_url: str, steps: int, *extra: str) -> list[str]:
    sets = [
        *TINY_TRAIN_SETS,
        *QUIET,
        f"data.url={data_url}",
        f"storage.run_url={run_url}",
        f"train.max_steps={steps}",
        *extra,
    ]
    return [
        "--log-level",
        "WARNING",
        "train",
        "--config",
        "toy-cpu",
        *[a for s in sets for a in ("--set", s)],
    ]


def _run(data_url: str, work: Path, steps: int, world: int) -> list[collections.Counter]:
    argv = _train_argv(data_url, f"file://{work}/run-{steps}", steps)
    out = str(work / f"counts-{steps}")
    mp.start_processes(_worker, args=(world, _free_port(), argv, out), nprocs=world, start_method="spawn")
    results = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        if res["code"] != 0:
            raise SystemExit(f"rank {r}: repa train exited {res['code']} ({steps} steps)")
    return [collections.Counter(res["counts"]) for res in results]


def _cuda_syncs(data_url: str, work: Path, short: int, long: int) -> dict[str, float]:
    """Device-to-host syncs per step on one GPU (``torch.cuda.set_sync_debug_mode("warn")``)."""
    from repa.cli import main

    per_run = {}
    for steps in (short, long):
        argv = _train_argv(data_url, f"file://{work}/cuda-{steps}", steps, "train.device=cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                assert main(argv) == 0
            finally:
                torch.cuda.set_sync_debug_mode("default")
        per_run[steps] = sum("synchronizing" in str(w.message) for w in caught)
    return {"cuda_syncs_per_step": (per_run[long] - per_run[short]) / (long - short)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", type=int, default=2, help="steps of the first run")
    parser.add_argument("--long", type=int, default=10, help="steps of the second run")
    parser.add_argument("--world", type=int, default=2, help="processes (gloo on CPU)")
    parser.add_argument("--cuda-syncs", action="store_true", help="also count CUDA syncs on one GPU")
    parser.add_argument("--smoke", action="store_true", help="CI smoke run: --short 2 --long 4")
    args = parser.parse_args(argv)
    if args.smoke:
        args.short, args.long = 2, 4

    import repa
    from repa.data.prepare import prepare_images, prepare_latents

    print(
        f"repa from {os.path.dirname(repa.__file__)}; torch {torch.__version__}; {args.world} processes, gloo"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tree = make_imagenet_tree(work, per_class=6, corrupt=0)
        data_url = f"file://{work}/shards"
        prepare_images(str(tree.root), data_url, resolution=16, samples_per_shard=4)
        prepare_latents(data_url, vae="none", batch_size=8)
        short = _run(data_url, work, args.short, args.world)
        long = _run(data_url, work, args.long, args.world)
        span = args.long - args.short
        print(f"per training step (runs of {args.long} and {args.short} steps):")
        for rank, (a, b) in enumerate(zip(short, long, strict=True)):
            per_step = {k: (b[k] - a[k]) / span for k in sorted(set(a) | set(b)) if b[k] != a[k]}
            collectives = sum(v for k, v in per_step.items() if k.startswith("collective:"))
            syncs = sum(v for k, v in per_step.items() if k.startswith("sync:"))
            detail = ", ".join(f"{k.split(':', 1)[1]} {v:.2f}" for k, v in per_step.items())
            print(
                f"  rank {rank}: {collectives:.2f} collectives, {syncs:.2f} host syncs from repa ({detail})"
            )
        if args.cuda_syncs and torch.cuda.is_available():
            for key, value in _cuda_syncs(data_url, work, args.short, args.long).items():
                print(f"  one GPU ({torch.cuda.get_device_name()}): {key.replace('_', ' ')} {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
