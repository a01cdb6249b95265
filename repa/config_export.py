"""What users see of the run config: the ``repa config`` verb, the JSON schema and the Markdown docs.

Both documents are generated from the dataclasses in :mod:`repa.config` (field types, ranges and the
docstring under each field), so they cannot drift: ``docs/configuration.md`` and the ``config:`` part
of the Helm chart's ``values.schema.json`` are checked against them by the tests.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import json
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from repa.config import (
    PRESET_KEY,
    PRESETS_DIR,
    REQUIRED_FOR,
    SECTIONS,
    _hints,
    _is_union,
    add_config_arguments,
    config_from_args,
    list_presets,
)

__all__ = ["add_arguments", "field_docs", "json_schema", "markdown_docs", "run"]


#################################################################################
#                          Docs and JSON schema (generated)                      #
#################################################################################


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (torchtitan style), read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _schema_for(tp: Any) -> dict[str, Any]:
    if tp is Any:
        return {}
    if _is_union(tp):
        arms = [a for a in get_args(tp) if a is not type(None)]
        nullable = len(arms) != len(get_args(tp))
        if len(arms) == 1:
            sub = _schema_for(arms[0])
            if nullable:
                if "enum" in sub:
                    sub["enum"] = [*sub["enum"], None]
                sub["type"] = [sub["type"], "null"] if isinstance(sub.get("type"), str) else sub.get("type")
            return sub
        return {"anyOf": [_schema_for(a) for a in get_args(tp)]}
    origin = get_origin(tp)
    if origin is Literal:
        return {"type": "string", "enum": list(get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _schema_for(get_args(tp)[0])}
    if origin is dict or tp is dict:
        return {"type": "object"}
    return {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]}


_SCHEMA_BOUNDS = (
    ("ge", "minimum"),
    ("gt", "exclusiveMinimum"),
    ("le", "maximum"),
    ("lt", "exclusiveMaximum"),
)


def json_schema() -> dict[str, Any]:
    """JSON schema (draft-07) of the run config: types, enums, ranges, defaults, descriptions.

    Helm's ``values.schema.json`` embeds it as the ``config`` property; no key is required (every
    field has a default), unknown keys are rejected (``additionalProperties: false``).
    """
    props: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        hints = _hints(cls)
        docs = field_docs(cls)
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            s = _schema_for(hints[f.name])
            for op, word in _SCHEMA_BOUNDS:
                if op in f.metadata:
                    s[word] = f.metadata[op]
            s["default"] = _default(f)
            s["description"] = docs.get(f.name, "")
            fields[f.name] = s
        props[name] = {
            "type": "object",
            "description": inspect.cleandoc(cls.__doc__ or ""),
            "additionalProperties": False,
            "properties": fields,
        }
    preset = {
        "type": "string",
        "enum": list_presets(),
        "description": "A bundled preset that the other keys are merged over (repa.config.resolve_preset).",
    }
    props = {PRESET_KEY: preset, **props}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "repa run config",
        "description": "The run config of `repa train/sample/eval/watch` (repa.config.RunConfig).",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
    }


def _md_type(tp: Any, meta: Mapping[str, Any]) -> str:
    if get_origin(tp) is Literal:
        text = " \\| ".join(f"`{a}`" for a in get_args(tp))
    elif _is_union(tp):
        text = " \\| ".join(_md_type(a, {}) for a in get_args(tp))
    elif tp is type(None):
        text = "null"
    elif get_origin(tp) is list:
        text = f"list[{_md_type(get_args(tp)[0], {}).replace('`', '')}]"
    elif get_origin(tp) is dict or tp is dict:
        text = "mapping"
    else:
        text = getattr(tp, "__name__", str(tp))
    bounds = [
        f"{sym} {meta[op]}" for op, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")) if op in meta
    ]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _md_cell(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def _preset_summary(name: str) -> str:
    """The first line of a preset file (a comment saying what it reproduces)."""
    first = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8").partition("\n")[0]
    return first.lstrip("#").strip()


def markdown_docs() -> str:
    """``docs/configuration.md``: every section and field with type, default, reference value, doc."""
    out = [
        "# Run configuration",
        "",
        "<!-- Generated by `repa config docs > docs/configuration.md` from repa/config.py; do not edit."
        " tests/unit/test_config.py fails when this file and the code disagree. -->",
        "",
        "One YAML file configures a run. It is read in this order: the file (or a bundled preset), then",
        "every `--set section.key=value` override, then validation of types, choices, ranges and the",
        "rules between keys, before any expensive work starts. The resolved config is saved with the",
        "run (`{run_url}/config.yaml`, every checkpoint, TensorBoard). A file may start from a preset",
        "with a top-level `preset: NAME` key; its other keys are merged over that preset (the Helm",
        "chart's `config.preset`).",
        "",
        "```bash",
        "repa config show --config sit-xl-2-repa --set train.global_batch_size=512   # resolved YAML",
        "repa config validate --config my-run.yaml --for train",
        "repa config schema          # JSON schema: the `config:` part of helm values.schema.json",
        "repa train --config sit-b-2-repa --set data.url=s3://bucket/imagenet-256 \\",
        "    --set storage.run_url=s3://bucket/runs/b2",
        "```",
        "",
        "- Unknown keys are errors (with the closest known key suggested). Values are coerced by the",
        "  declared type: int fields accept integral floats such as `4e+06` (Helm renders big ints so),",
        "  `--set` values are parsed as YAML (`[a, b]`, `null`, `true`).",
        "- Defaults are the paper's SiT-XL/2 + REPA values. The *Reference* column shows what the",
        "  reference code (sihyun-yu/REPA) uses where our default differs.",
        "- Storage locations are fsspec URLs (`s3://`, `gs://`, `file://`, or a local path).",
        "  `storage_options` carries endpoints and flags only: credentials come from the environment",
        "  (`AWS_*`, `GOOGLE_APPLICATION_CREDENTIALS`) or a mounted Secret, never from a config file.",
        "",
        "## Presets",
        "",
        "Bundled in `repa/configs/`; pass the name to `--config`.",
        "",
        "| preset | reproduces |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {_md_cell(_preset_summary(name))} |" for name in list_presets()]
    out.append("")
    for name, cls in SECTIONS.items():
        hints = _hints(cls)
        docs = field_docs(cls)
        out += [f"## `{name}`", "", _md_cell(inspect.cleandoc(cls.__doc__ or "")), ""]
        out += ["| key | type | default | reference | description |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = json.dumps(_default(f))
            ref = f.metadata.get("reference", "")
            out.append(
                f"| `{name}.{f.name}` | {_md_type(hints[f.name], f.metadata)} | `{_md_cell(default)}` "
                f"| {_md_cell(ref)} | {_md_cell(docs.get(f.name, ''))} |"
            )
        out.append("")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`repa config {show,validate,schema,docs,presets}`."""
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = sub.add_parser("show", help="print the resolved config as YAML", description="Print the config.")
    add_config_arguments(p)
    p = sub.add_parser(
        "validate", help="check a config and exit 0 (valid) or 2", description="Validate a config."
    )
    add_config_arguments(p)
    p.add_argument(
        "--for",
        dest="verb",
        choices=sorted(REQUIRED_FOR),
        help="also require the keys this verb needs (e.g. data.url and storage.run_url for train)",
    )
    p = sub.add_parser("schema", help="print the config's JSON schema", description="Print the JSON schema.")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p = sub.add_parser(
        "docs", help="print docs/configuration.md (Markdown)", description="Print the config reference."
    )
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    sub.add_parser("presets", help="list bundled presets", description="List the bundled presets.")


def run(args: argparse.Namespace) -> int:
    """Run a `repa config` action; ConfigError propagates to the CLI (exit code 2)."""
    action = args.config_command
    if action == "show":
        sys.stdout.write(config_from_args(args).to_yaml())
    elif action == "validate":
        cfg = config_from_args(args)
        if args.verb:
            cfg.require_for(args.verb, args.config)
        n = len(args.overrides)
        sys.stdout.write(f"ok: {args.config or 'defaults'}{f' with {n} override(s)' if n else ''}\n")
    elif action in ("schema", "docs"):
        text = json.dumps(json_schema(), indent=2) + "\n" if action == "schema" else markdown_docs()
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    elif action == "presets":
        for name in list_presets():
            sys.stdout.write(f"{name}: {_preset_summary(name)}\n")
    return 0
