"""repa.cli: verb dispatch, lazy verb modules, `repa config`, and config errors as exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from repa import __version__, cli
from repa.config import RunConfig, load_config
from repa.config_export import json_schema, markdown_docs

ROOT = Path(__file__).resolve().parents[2]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_show_prints_yaml_that_loads_back(capsys):
    code, out, err = _run(capsys, "config", "show", "--config", "toy-cpu", "--set", "train.lr=0.002")
    assert code == 0 and err == ""
    assert RunConfig.from_yaml(out) == load_config("toy-cpu", ["train.lr=0.002"])


def test_config_show_without_config_prints_the_defaults(capsys):
    code, out, _ = _run(capsys, "config", "show")
    assert code == 0 and RunConfig.from_yaml(out) == RunConfig()


def test_bad_config_exits_2_with_one_line_message_and_no_traceback(capsys):
    code, out, err = _run(capsys, "config", "show", "--set", "train.lrr=1e-4")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.lrr" in err and "did you mean train.lr?" in err


def test_validate_reports_ok_or_the_missing_key(capsys, tmp_path):
    code, out, _ = _run(capsys, "config", "validate", "--config", "sit-b-2-repa", "--set", "train.lr=2e-4")
    assert code == 0 and out.startswith("ok: sit-b-2-repa")
    code, _, err = _run(capsys, "config", "validate", "--config", "sit-b-2-repa", "--for", "train")
    assert code == 2 and "data.url" in err and "required by `repa train`" in err


def test_config_schema_prints_the_json_schema(capsys):
    code, out, _ = _run(capsys, "config", "schema")
    assert code == 0 and json.loads(out) == json_schema()


def test_config_docs_writes_the_markdown_reference(capsys, tmp_path):
    target = tmp_path / "configuration.md"
    assert _run(capsys, "config", "docs", "--output", str(target))[0] == 0
    assert target.read_text(encoding="utf-8") == markdown_docs()


def test_config_presets_lists_every_preset(capsys):
    code, out, _ = _run(capsys, "config", "presets")
    assert code == 0 and "sit-xl-2-repa: " in out and "toy-cpu: " in out


def test_version_and_help(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"repa {__version__}"
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for verb, command in cli.COMMANDS.items():
        assert verb in out and command.summary.split()[0] in out


def test_no_verb_or_unknown_action_is_a_usage_error(capsys):
    code, _, err = _run(capsys)
    assert code == 2 and "usage: repa" in err
    code, _, err = _run(capsys, "config", "bogus")
    assert code == 2 and "invalid choice" in err


@pytest.fixture
def verb_package(tmp_path, monkeypatch):
    """A throwaway package ``fakeverbs`` on sys.path; ``.add(name, source, verb)`` registers a verb module."""
    pkg = tmp_path / "fakeverbs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('the package __init__ must not run for --help')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str, verb: str) -> None:
        (pkg / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.setitem(cli.COMMANDS, verb, cli.Command(f"fakeverbs.{name}", f"fake verb {verb}"))

    yield SimpleNamespace(add=write, pkg=pkg)
    for mod in [m for m in sys.modules if m == "fakeverbs" or m.startswith("fakeverbs.")]:
        del sys.modules[mod]


def test_help_lists_verbs_without_importing_their_packages(capsys, verb_package):
    verb_package.add("hello", "def add_arguments(p): pass\ndef run(args): return 0\n", "hello")
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "fake verb hello" in out
    assert "fakeverbs" not in sys.modules


def test_dispatch_passes_config_args_and_returns_the_verb_code(capsys, verb_package):
    (verb_package.pkg / "__init__.py").write_text("")
    verb_package.add(
        "hello",
        """
        from repa.config import add_config_arguments, config_from_args

        def add_arguments(parser):
            add_config_arguments(parser)
            parser.add_argument("--code", type=int, default=0)

        def run(args):
            cfg = config_from_args(args)
            print(cfg.train.max_steps)
            return args.code
        """,
        "hello",
    )
    code, out, _ = _run(
        capsys, "hello", "--config", "toy-cpu", "--set", "train.max_steps=4e+06", "--code", "7"
    )
    assert code == 7 and out.strip() == "4000000"
    code, _, err = _run(capsys, "hello", "--set", "train.precision=fp8")
    assert code == 2 and err.count("\n") == 1 and "train.precision" in err and "bf16" in err


def test_real_import_error_inside_a_verb_module_surfaces(verb_package):
    (verb_package.pkg / "__init__.py").write_text("")
    verb_package.add("broken", "import module_that_does_not_exist_xyz\n", "broken")
    with pytest.raises(ModuleNotFoundError, match="module_that_does_not_exist_xyz"):
        cli.main(["broken"])


def test_python_m_repa_exits_2_on_a_bad_config_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  precision: fp8\n")
    proc = subprocess.run(
        [sys.executable, "-m", "repa", "config", "show", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "train.precision" in proc.stderr and "'fp8'" in proc.stderr


def test_help_does_not_import_torch():
    code = "import sys; from repa.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_log_level_value_is_not_mistaken_for_the_verb(capsys):
    from repa.cli import main

    assert main(["--log-level", "WARNING", "config", "show", "--config", "toy-cpu"]) == 0
    assert "SiT-S/2" in capsys.readouterr().out
