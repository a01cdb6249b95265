"""Regenerate the `config:` part of helm/repa/values.schema.json from repa's own config schema.

    .venv/bin/python tests/chart/update_values_schema.py          # rewrite the file
    .venv/bin/python tests/chart/update_values_schema.py --check  # exit 1 if it drifted

Only ``definitions.repaRunConfig`` is generated (from :func:`repa.config_export.json_schema`, the same tree as
``repa config schema``); ``properties.config`` combines it (``allOf``) with the hand-written
``definitions.chartRequiredConfig`` (data.url and storage.run_url must be fsspec URLs). The Kubernetes
part of the schema is hand-written. tests/chart/test_chart.py fails when the generated part drifts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "helm" / "repa" / "values.schema.json"


def generated_run_config_schema() -> dict[str, Any]:
    """repa.config_export.json_schema() without its `$schema` key (a definition of the chart's schema)."""
    from repa.config_export import json_schema

    return {k: v for k, v in json_schema().items() if k != "$schema"}


def render(current: dict[str, Any]) -> str:
    """The whole values.schema.json text with the generated definition replaced."""
    updated = dict(current)
    updated["definitions"] = {**current["definitions"], "repaRunConfig": generated_run_config_schema()}
    return json.dumps(updated, indent=2, ensure_ascii=False) + "\n"


def update_file(path: Path, new: str, check: bool, what: str) -> int:
    """Write ``new`` to ``path`` (or with ``check`` only report a difference, exit code 1)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if new == old:
        print(f"{path}: up to date")
        return 0
    if check:
        print(f"{path}: {what} drifted; run {sys.argv[0]}")
        return 1
    path.write_text(new, encoding="utf-8")
    print(f"{path}: regenerated {what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1), do not write")
    args = parser.parse_args(argv)
    new = render(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    return update_file(
        SCHEMA_PATH, new, args.check, "definitions.repaRunConfig (repa.config_export.json_schema())"
    )


if __name__ == "__main__":
    sys.exit(main())
