"""Generate helm/repa/README.md (what `helm show readme` prints) from Chart.yaml and values.yaml.

    .venv/bin/python tests/chart/update_chart_readme.py          # rewrite the file
    .venv/bin/python tests/chart/update_chart_readme.py --check  # exit 1 if it drifted

The values table is helm-docs' (as kuberay and kueue publish theirs): one row per key that carries a
``# --`` comment in values.yaml (the comment, continued on the following ``#`` lines, is the
description), its type and its default; keys inside a documented key's default are covered by that row.
Written here rather than by the helm-docs binary (a Go tool, not on PyPI): the format is that small.
tests/chart/test_chart.py fails when the README drifted or misses a value.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "repa"
README = CHART / "README.md"
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$")

INTRO = """\
# {name}

{description}

Version {version}, repa {app_version}, Kubernetes {kube_version}. Backend `trainjob` (the default) needs
Kubeflow Trainer v2 (the `torch-distributed` ClusterTrainingRuntime); backend `pytorchjob` needs the
Kubeflow Training Operator v1.9. The full guide is docs/kubernetes.md in the repa repository.

## Install

Three values have no default, and `helm install` / `helm template` stop in one line naming the missing
ones:

- `image.repository`: the repa image in a registry your nodes pull from. `make image` builds
  `localhost/repa:{app_version}` from docker/Dockerfile; push it (e.g. to `ghcr.io/<you>/repa:{app_version}`)
  and set `image.repository=ghcr.io/<you>/repa` (the tag defaults to the chart's appVersion).
- `config.data.url`: the dataset `repa prepare` wrote (s3://, gs://, file://).
- `config.storage.run_url`: where the run writes checkpoints, TensorBoard events and eval results.

With the evaluator on (the default), `config.eval.reference_stats_url` is required too (no preset
carries it); or set `evaluator.enabled=false`.

```bash
helm install myrun ./helm/repa -n ml \\
  --set image.repository=ghcr.io/<you>/repa \\
  --set config.preset=sit-b-2-repa \\
  --set config.data.url=s3://my-bucket/imagenet-256 \\
  --set config.storage.run_url=s3://my-bucket/runs/myrun \\
  --set config.eval.reference_stats_url=s3://my-bucket/refstats/VIRTUAL_imagenet256_labeled.npz
repa status myrun -n ml
```

## Values

Generated from values.yaml by tests/chart/update_chart_readme.py; values.schema.json checks types and
ranges, and the templates the cross-field rules.

| Key | Type | Default | Description |
|-----|------|---------|-------------|
"""


def documented_keys(text: str) -> list[tuple[str, str]]:
    """``(dotted key, description)`` of every key with a ``# --`` comment, in file order."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body.startswith("--"):
                comment = [body[2:].strip()]
            elif comment:
                comment.append(body)
            continue
        m = _KEY.match(line)
        if not stripped or stripped.startswith("- ") or not m:
            comment = [] if not stripped else comment
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m.group(2)])
        if comment:
            out.append((key, " ".join(comment)))
        stack.append((indent, m.group(2)))
        comment = []
    return out


def _lookup(values: dict[str, Any], key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        node = node[part]
    return node


def _type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[
        type(value)
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    out = INTRO.format(
        name=chart["name"],
        description=" ".join(chart["description"].split()),
        version=chart["version"],
        app_version=chart["appVersion"],
        kube_version=chart["kubeVersion"],
    )
    for key, description in documented_keys(text):
        value = _lookup(values, key)
        default = json.dumps(value, separators=(",", ":"))
        out += f"| `{key}` | {_type(value)} | `{_cell(default)}` | {_cell(description)} |\n"
    return out


def main(argv: list[str] | None = None) -> int:
    from update_values_schema import update_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1), do not write")
    args = parser.parse_args(argv)
    return update_file(README, render(), args.check, "the values table (values.yaml, Chart.yaml)")


if __name__ == "__main__":
    sys.exit(main())
