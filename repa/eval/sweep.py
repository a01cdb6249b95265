"""`repa eval sweep`: score one checkpoint over a grid of guidance scales x interval ends.

Labs reach numbers like REPA's 1.42 (w = 1.8 on t in [0, 0.7]) by sweeping the CFG scale and the
guidance interval per checkpoint; this does it as one resumable, shardable job.

- **Common random numbers.** Every cell samples with the same ``sample.seed`` and ``num_samples``, and
  sample ``i``'s label, initial noise and SDE noise depend only on ``(seed, i)``
  (``repa.eval.sample.sample_inputs``), never on the guidance: every cell scores the same labels and
  noises, so differences between cells are the guidance's, not sampling noise.
- **Resumable cell by cell.** A cell is an ordinary ``repa eval`` of the checkpoint with
  ``sample.cfg_scale`` / ``sample.guidance_high`` set: its result JSON marks it done, its samples are
  chunked, so a killed sweep loses at most a chunk.
- **Sharded.** ``--index I --count N`` takes cells ``I, I+N, ...`` (an Indexed Job's pod: ``I`` from
  ``JOB_COMPLETION_INDEX``, see :func:`sweep_job`). Whichever process finds every cell done writes the
  summary; it depends only on the cells' scores, so it is the same bytes whoever writes it.

Outputs, beside the checkpoint's results (``{run_url}/eval/step-NNNNNNN/sweep-<digest>/``):
``sweep.json`` (every cell, the best cell per metric), ``sweep.md`` (the table), ``heatmap.png``
(the score per cell), and in TensorBoard ``eval/sweep`` (the heat map and the table) at the step.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from repa import checkpoint as ckpt
from repa import storage
from repa.config import ConfigError, RunConfig
from repa.eval.sample_set import identity_digest

log = logging.getLogger(__name__)

__all__ = [
    "SweepGrid",
    "best_lines",
    "cell_config",
    "heatmap_png",
    "parse_values",
    "render_sweep_job",
    "run_sweep",
    "sweep_digest",
    "sweep_folder",
    "sweep_job",
]

# metric key in a result JSON -> is lower better?
METRICS = {
    "fid": True,
    "sfid": True,
    "inception_score_mean": False,
    "precision": False,
    "recall": False,
    "fd_dinov2": True,
}
SUMMARY_FILES = ("sweep.json", "sweep.md", "heatmap.png")


def parse_values(text: str, flag: str) -> tuple[float, ...]:
    """``"1.0,1.4,1.8"`` -> ``(1.0, 1.4, 1.8)``; a one-line error naming the flag otherwise."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(flag, f"{text!r}: expected comma-separated numbers, e.g. 1.0,1.4,1.8") from None
    if not values or len(set(values)) != len(values):
        raise ConfigError(flag, f"{text!r}: expected distinct comma-separated numbers, e.g. 1.0,1.4,1.8")
    return values


@dataclass(frozen=True)
class SweepGrid:
    """The cells: every CFG scale x every guidance-interval end, row-major (scale, then high)."""

    cfg_scales: tuple[float, ...]
    guidance_highs: tuple[float, ...]

    @property
    def cells(self) -> list[tuple[float, float]]:
        return [(w, h) for w in self.cfg_scales for h in self.guidance_highs]

    def to_dict(self) -> dict[str, list[float]]:
        return {"cfg_scale": list(self.cfg_scales), "guidance_high": list(self.guidance_highs)}


def cell_config(
    cfg: RunConfig,
    cfg_scale: float,
    guidance_high: float,
    *,
    tensorboard: bool | None = None,
    tensorboard_run: str | None = None,
) -> RunConfig:
    """``cfg`` with the cell's guidance (validated like any config: a bad interval names the key).

    ``tensorboard=False`` for a sweep's own cells: their scores reach TensorBoard as the sweep's heat map
    and table (``eval/sweep``), never as ``eval/fid`` points at the checkpoint's step, where a cell of
    a few thousand samples would sit beside (and, in ``eval/best_fid``, beat) the full-protocol score.
    """
    tree = copy.deepcopy(cfg.to_dict())
    tree["sample"].update(cfg_scale=cfg_scale, guidance_high=guidance_high)
    if tensorboard is not None:
        tree["log"]["tensorboard"] = tensorboard
    if tensorboard_run is not None:
        tree["eval"]["tensorboard_run"] = tensorboard_run
    return RunConfig.from_dict(tree)


def _plans(cfg: RunConfig, source: ckpt.CheckpointSource, grid: SweepGrid) -> list[Any]:
    from repa.eval.evaluate import plan_evaluation

    return [plan_evaluation(cell_config(cfg, w, h), source) for w, h in grid.cells]


def _digest(grid: SweepGrid, plans: list[Any]) -> str:
    return identity_digest({"grid": grid.to_dict(), "cells": [p.digest for p in plans]})[:12]


def _folder(grid: SweepGrid, plans: list[Any]) -> storage.Location:
    result = plans[0].result
    return storage.Location(f"{result.url.rpartition('/')[0]}/sweep-{_digest(grid, plans)}", result.options)


def sweep_digest(cfg: RunConfig, source: ckpt.CheckpointSource, grid: SweepGrid) -> str:
    """The sweep's identity: the grid and every cell's evaluation protocol (12 hex digits)."""
    return _digest(grid, _plans(cfg, source, grid))


def sweep_folder(cfg: RunConfig, source: ckpt.CheckpointSource, grid: SweepGrid) -> storage.Location:
    """``sweep-<digest>`` beside the checkpoint's results (:func:`sweep_digest`), so another grid or
    protocol never mixes into these files."""
    return _folder(grid, _plans(cfg, source, grid))


def run_sweep(
    cfg: RunConfig,
    source: ckpt.CheckpointSource,
    grid: SweepGrid,
    *,
    info: Any = None,
    index: int = 0,
    count: int = 1,
    check_config: bool = True,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    sample_parts: int = 1,
) -> dict[str, Any] | None:
    """Score this process's share of the work, then write the summary if every cell is done.

    The work is ``cells x sample_parts`` units, unit ``u = cell * sample_parts + part`` going to index
    ``u % count``; a unit samples the chunks ``c % sample_parts == part`` of its cell's sample set
    (``sample_parts`` 1: whole cells). Whoever completes a cell's last part scores it, and whoever
    finds every cell scored writes the summary: each checks storage after its own writes, so the last
    one always sees everything (and the bytes depend only on the scores).

    Returns the summary (``sweep.json``'s content) when it was written or already there, else None
    (other indices still have work).
    """
    from repa.eval.evaluate import evaluate_checkpoint

    if not 0 <= index < count:
        raise ConfigError("--index", f"{index} is outside [0, {count}) (--count {count})")
    if sample_parts < 1:
        raise ConfigError("--sample-parts", f"{sample_parts}: expected at least 1")
    plans = _plans(cfg, source, grid)
    chunks = plans[0].spec.num_chunks
    if sample_parts > chunks:
        raise ConfigError(
            "--sample-parts",
            f"{sample_parts} parts of a cell's {chunks} sample chunk(s) ({plans[0].spec.num_samples} "
            f"samples, sample.chunk_size {plans[0].spec.chunk_size}): a part would have nothing to do; use "
            f"at most {chunks}, or a smaller --chunk-size",
        )
    cache: dict[Any, Any] = {}  # the reference statistics and the feature network, loaded once
    for u in range(index, len(grid.cells) * sample_parts, count):
        k, part = divmod(u, sample_parts)
        w, h = grid.cells[k]
        share = f", samples part {part + 1}/{sample_parts}" if sample_parts > 1 else ""
        log.info("sweep cell %d/%d: cfg_scale %g, guidance_high %g%s", k + 1, len(plans), w, h, share)
        evaluate_checkpoint(
            cell_config(cfg, w, h, tensorboard=False),
            source,
            info=info,
            check_config=check_config,
            progress=progress,
            should_stop=should_stop,
            cache=cache,
            share=(part, sample_parts) if sample_parts > 1 else None,
            sweep_cell=True,
        )
    if info is not None and not info.is_main:
        return None
    pending = [p for p in plans if not storage.exists(p.result)]
    if pending:
        log.info("sweep: %d cell(s) left to other indices", len(pending))
        return None
    folder = _folder(grid, plans)
    results = [json.loads(storage.read_bytes(p.result)) for p in plans]
    summary = summarize(grid, source, plans, results)
    write_summary(cfg, source, folder, summary)
    if sample_parts > 1 and not cfg.eval.keep_samples:  # shared cells keep their samples until now
        from repa.eval.sample_set import SampleSet

        for plan in plans:
            if storage.exists(plan.samples.join("protocol.json")):
                SampleSet.open(plan.samples).delete()
    return summary


def summarize(grid: SweepGrid, source: ckpt.CheckpointSource, plans: list[Any], results: list[dict]) -> dict:
    """The sweep's table and its best cell per metric (only scores: the same whoever computes it)."""
    from repa.eval.report import metric_labels, score_label

    cells = []
    for (w, h), plan, result in zip(grid.cells, plans, results):
        row = {"cfg_scale": w, "guidance_high": h, "result": plan.result.url}
        row.update({key: result.get(key) for key in METRICS})
        cells.append(row)
    best = {}
    for key, lower in METRICS.items():
        scored = [c for c in cells if c[key] is not None]
        if scored:
            pick = (min if lower else max)(scored, key=lambda c: c[key])
            best[key] = {
                "cfg_scale": pick["cfg_scale"],
                "guidance_high": pick["guidance_high"],
                "value": pick[key],
            }
    return {
        "checkpoint": source.url,
        "step": source.step,
        "score": score_label(results[0]),
        "grid": grid.to_dict(),
        "cells": cells,
        "best": best,
        "labels": {key: label for key, label in metric_labels(results[0]).items() if key in best},
    }


def table_markdown(summary: dict) -> str:
    """Rows: CFG scale; columns: guidance-interval end; values: the Fréchet distance."""
    highs = summary["grid"]["guidance_high"]
    by_cell = {(c["cfg_scale"], c["guidance_high"]): c["fid"] for c in summary["cells"]}
    lines = [
        f"{summary['score']} of {summary['checkpoint']} by CFG scale (rows) and guidance interval [0, high] "
        "(columns); every cell scores the same labels and noises",
        "",
        "| w \\ high | " + " | ".join(f"{h:g}" for h in highs) + " |",
        "|---|" + "---|" * len(highs),
    ]
    for w in summary["grid"]["cfg_scale"]:
        lines.append(f"| {w:g} | " + " | ".join(f"{by_cell[(w, h)]:.4f}" for h in highs) + " |")
    return "\n".join([*lines, "", *best_lines(summary)]) + "\n"


def best_lines(summary: dict) -> list[str]:
    """``best FID (10000 samples): 1.4200 at w = 1.8, [0, 0.7]``: one line per metric, each named as the
    printed line names it (``repa.eval.report.metric_labels``)."""
    labels = summary.get("labels", {})
    return [
        f"best {labels.get(key, key)}: {cell['value']:.4f} at w = {cell['cfg_scale']:g}, "
        f"[0, {cell['guidance_high']:g}]"
        for key, cell in summary["best"].items()
    ]


def heatmap_png(summary: dict, cell_px: int = 72) -> bytes:
    """The score per cell as a PNG (rows: CFG scale, columns: interval end; darker = lower = better).

    Drawn with Pillow (no timestamps or library metadata in the file), so the same scores give the
    same bytes on every pod.
    """
    from PIL import Image, ImageDraw

    scales, highs = summary["grid"]["cfg_scale"], summary["grid"]["guidance_high"]
    values = {(c["cfg_scale"], c["guidance_high"]): c["fid"] for c in summary["cells"]}
    lo, hi = min(values.values()), max(values.values())
    # What the numbers are (network, sample count) and what the axes mean, above the grid.
    caption = [
        f"{summary['score']} per cell (darker = lower)",
        "rows: CFG scale w; columns: interval [0, high]",
    ]
    top = 16 * len(caption) + 8
    margin = cell_px
    width = max(margin + cell_px * len(highs), 8 + 6 * max(len(line) for line in caption))  # ~6 px per glyph
    image = Image.new("RGB", (width, top + margin + cell_px * len(scales)), "white")
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(caption):
        draw.text((4, 4 + 16 * k), line, fill="black")
    draw.text((4, top + 4), "w \\ high", fill="black")
    for j, h in enumerate(highs):
        draw.text((margin + j * cell_px + 4, top + margin - 16), f"{h:g}", fill="black")
    for i, w in enumerate(scales):
        draw.text((4, top + margin + i * cell_px + cell_px // 2 - 6), f"{w:g}", fill="black")
        for j, h in enumerate(highs):
            v = values[(w, h)]
            t = 0.0 if hi == lo else (v - lo) / (hi - lo)  # 0 = best (lowest)
            colour = tuple(int(a + (b - a) * t) for a, b in zip((31, 64, 140), (250, 230, 120)))
            box = (
                margin + j * cell_px,
                top + margin + i * cell_px,
                margin + (j + 1) * cell_px - 1,
                top + margin + (i + 1) * cell_px - 1,
            )
            draw.rectangle(box, fill=colour)
            draw.text(
                (box[0] + 6, box[1] + cell_px // 2 - 6), f"{v:.3f}", fill="black" if t > 0.5 else "white"
            )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_summary(
    cfg: RunConfig, source: ckpt.CheckpointSource, folder: storage.Location, summary: dict
) -> None:
    """``sweep.json``, ``sweep.md``, ``heatmap.png`` (atomic writes) and TensorBoard ``eval/sweep``."""
    png = heatmap_png(summary)
    table = table_markdown(summary)
    if source.run_url and source.step is not None and cfg.log.tensorboard:
        _tensorboard(cfg, source, png, table)
    storage.write_bytes_atomic(folder.join("heatmap.png"), png)
    storage.write_bytes_atomic(folder.join("sweep.md"), table.encode())
    storage.write_bytes_atomic(
        folder.join("sweep.json"), (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    )
    log.info("sweep of %s: %s", source.url, "; ".join(best_lines(summary)))


def _tensorboard(cfg: RunConfig, source: ckpt.CheckpointSource, png: bytes, table: str) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from repa.tensorboard import TensorBoardLogger

    log_at = cfg.storage.locate(source.run_url).join("tensorboard", cfg.eval.tensorboard_run)
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1)
    tb = TensorBoardLogger(log_at)
    try:
        tb.image("eval/sweep", image, source.step)
        tb.text("eval/sweep", table, source.step)
    finally:
        tb.close()


# ----------------------------------------------------------------------------------------------
# Kubernetes: one Indexed Job whose indices split the cells
# ----------------------------------------------------------------------------------------------


def sweep_job(
    job: dict[str, Any], grid: SweepGrid, count: int, digest: str, sample_parts: int = 1
) -> dict[str, Any]:
    """Turn the eval Job of a checkpoint (``repa eval-job``'s manifest) into ONE Indexed Job of the sweep.

    ``count`` pods (``completionMode: Indexed``): pod ``I`` runs ``repa eval sweep ... --count N`` and
    reads ``I`` from ``JOB_COMPLETION_INDEX`` (set by Kubernetes in Indexed Jobs). ``sample_parts`` > 1
    splits each cell's samples too (cells x sample ranges, :func:`run_sweep`). A pod that dies is
    retried by the Job (``backoffLimitPerIndex`` when the template sets it); finished chunks are kept.
    """
    if count < 1:
        raise ConfigError("--sweep-pods", f"{count}: expected at least 1")
    if sample_parts < 1:
        raise ConfigError("--sample-parts", f"{sample_parts}: expected at least 1")
    job = copy.deepcopy(job)
    meta = job["metadata"]
    meta["name"] = f"{meta['name'][:40].rstrip('-')}-sweep-{digest[:10]}"
    meta.setdefault("labels", {})["repa.io/sweep"] = digest[:12]
    spec = job["spec"]
    spec.update(completionMode="Indexed", completions=count, parallelism=count)
    extra = [
        "--cfg-scale",
        ",".join(f"{w:g}" for w in grid.cfg_scales),
        "--guidance-high",
        ",".join(f"{h:g}" for h in grid.guidance_highs),
        "--count",
        str(count),
        *(["--sample-parts", str(sample_parts)] if sample_parts > 1 else []),
    ]
    for container in spec["template"]["spec"]["containers"]:
        args = list(container.get("args") or [])
        if not args or args[0] != "eval":
            raise ConfigError(
                "--job-template",
                f"the eval Job template's container {container.get('name')!r} does not run `repa eval`",
            )
        container["args"] = ["eval", "sweep", *args[1:], *extra]
    return job


def render_sweep_job(
    cfg: RunConfig,
    job: dict[str, Any],
    cfg_scales: str,
    guidance_highs: str,
    pods: int,
    sample_parts: int = 1,
) -> dict[str, Any]:
    """``repa eval-job --sweep``: the checkpoint's eval Job (as ``repa eval-job`` renders it) as the
    sweep's Indexed Job; the name carries the sweep's digest, so re-applying it is a no-op."""
    grid = SweepGrid(parse_values(cfg_scales, "--cfg-scale"), parse_values(guidance_highs, "--guidance-high"))
    meta = job["metadata"]
    step = int(meta["labels"]["repa.io/checkpoint-step"])
    url = meta["annotations"]["repa.io/checkpoint-url"]
    source = ckpt.CheckpointSource(url, "run", step, cfg.storage.run_url.rstrip("/"))
    return sweep_job(job, grid, pods, sweep_digest(cfg, source, grid), sample_parts)


def index_from_environment(flag: int | None) -> int:
    """``--index``, else ``JOB_COMPLETION_INDEX`` (an Indexed Job's pod), else 0."""
    if flag is not None:
        return flag
    text = os.environ.get("JOB_COMPLETION_INDEX", "0")
    if not text.isdigit():
        raise ConfigError("JOB_COMPLETION_INDEX", f"{text!r}: expected the pod's index (0, 1, ...)")
    return int(text)
