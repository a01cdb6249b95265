"""The README's commands work as written, and cannot drift from the Makefile and the CLI.

Fast (always): every command in README.md's shell blocks is checked against the code it names. A
``make X`` must be a Makefile target; a ``repa ...`` / ``.venv/bin/repa ...`` / ``python -m repa ...``
command must parse with the real argument parser (so every verb and flag exists); any other program
must be one this test knows. The set-up commands ``make demo`` and ``make test`` must be there, and
every relative link must point at a file of the repository.

Slow (``REPA_RUN_README_TEST=1``): clone the repository (its committed HEAD: commit first) into a
temporary folder, then run the README's set-up commands there, as written, in a clean environment:
no virtual environment, no PYTHONPATH, nothing of this checkout on PATH. ``make demo`` and
``make test`` build their own ``.venv`` from PyPI (torch included), so this takes a long time and
needs PyPI; the lead runs it by hand and records the result. The clone's own ``make test`` runs this
file too, without the variable, so it does not recurse.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP_COMMANDS = ("make demo", "make test")
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
# Programs a README command may start with besides make and repa (tensorboard comes with the venv).
KNOWN_PROGRAMS = {"tensorboard", "helm", "kubectl", "docker", "git", "cd", "ls", "cat"}
_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_TARGET = re.compile(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", re.M)


def readme_path() -> Path:
    """README.md of this checkout (``REPA_README`` names another file, e.g. a proposed text)."""
    return Path(os.environ.get("REPA_README", ROOT / "README.md"))


def shell_commands(markdown: str) -> list[str]:
    """Commands of the shell code blocks: ``$ `` prompts and comments dropped, ``\\`` lines joined."""
    commands: list[str] = []
    for lang, body in _FENCE.findall(markdown):
        if lang.lower() not in SHELL_LANGS:
            continue
        pending = ""
        for raw in body.splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            line = line.removeprefix("$ ")
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            command = (pending + line).split(" #", 1)[0].strip()  # trailing comment
            pending = ""
            if command:
                commands.append(command)
    return commands


def makefile_targets(makefile: str) -> set[str]:
    """Targets that have a rule (``name: ...``; not ``VAR := ...``, not special ``.PHONY``-like names)."""
    return {t for group in _TARGET.findall(makefile) for t in group.split() if not t.startswith(".")}


def repa_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after the repa program in ``tokens``, or None if it is not a repa command."""
    if tokens and Path(tokens[0]).name == "repa":
        return tokens[1:]
    if len(tokens) >= 3 and Path(tokens[0]).name.startswith("python") and tokens[1:3] == ["-m", "repa"]:
        return tokens[3:]
    return None


def check_command(command: str, targets: set[str]) -> str | None:
    """None if ``command`` names only things that exist, else what is wrong."""
    from repa.cli import build_parser

    tokens = shlex.split(command)
    env = 0
    while env < len(tokens) and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[env]):
        env += 1  # VAR=value prefixes
    tokens = tokens[env:]
    if not tokens:
        return "empty command"
    if tokens[0] == "make":
        names = [t for t in tokens[1:] if not t.startswith("-") and "=" not in t]
        missing = [n for n in names if n not in targets]
        return f"no Makefile target {missing}" if missing else None
    argv = repa_argv(tokens)
    if argv is not None:
        if any(t.startswith("<") or t in ("...", "…") for t in argv):
            return None  # a template with placeholders: the verb is still checked below
        parser = build_parser(argv)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                parser.parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                return f"`repa {' '.join(argv)}` does not parse: {stderr.getvalue().strip()}"
        return None
    if Path(tokens[0]).name in KNOWN_PROGRAMS:
        return None
    return f"unknown program {tokens[0]!r}: teach tests/integration/test_readme_commands.py about it"


def test_shell_commands_are_extracted_as_written():
    text = "x\n```bash\n# comment\n$ make demo   # 2 min\nrepa train \\\n  --config toy-cpu\n```\n"
    text += "```yaml\nnot: a command\n```\n"
    assert shell_commands(text) == ["make demo", "repa train --config toy-cpu"]
    makefile = "A := 1\nvenv: $(STAMP)\n.PHONY: demo test\ntest: venv\n"
    assert makefile_targets(makefile) == {"venv", "test"}
    assert check_command("make nothing-like-this", {"test"}) is not None
    assert check_command("repa no-such-verb", set()) is not None
    assert check_command("repa train --no-such-flag", set()) is not None
    assert check_command("repa train --config toy-cpu", set()) is None


def test_readme_has_the_two_setup_commands():
    commands = shell_commands(readme_path().read_text())
    for command in SETUP_COMMANDS:
        assert command in commands, f"README.md must show `{command}` in a shell block"


def test_every_readme_command_names_a_real_make_target_repa_verb_and_flags():
    targets = makefile_targets((ROOT / "Makefile").read_text())
    commands = shell_commands(readme_path().read_text())
    problems = {c: p for c in commands if (p := check_command(c, targets)) is not None}
    assert not problems, "README.md commands that do not match the code:\n" + "\n".join(
        f"  {c}: {p}" for c, p in problems.items()
    )


def test_every_relative_link_in_the_readme_exists():
    links = [u for u in _LINK.findall(readme_path().read_text()) if "://" not in u and not u.startswith("#")]
    missing = [u for u in links if not (ROOT / u.split("#", 1)[0]).exists()]
    assert links and not missing, f"README.md links to missing files: {missing}"


def _clean_env(home: Path) -> dict[str, str]:
    """A fresh-container-like environment: system PATH only, no venv, no PYTHONPATH, no repa variables.

    ``HOME`` stays (pip's download cache makes a second run faster; nothing of repa lives there);
    proxy and pip index settings are kept so PyPI stays reachable where it needs them.
    """
    venv_bins = {str(Path(sys.prefix) / "bin"), str(ROOT / ".venv" / "bin")}
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p not in venv_bins]
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "TERM", "USER")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.lower().endswith("_proxy") or k.startswith("PIP_")})
    env["PATH"] = os.pathsep.join(path)
    env.setdefault("HOME", str(home))
    return env


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("REPA_RUN_README_TEST") != "1",
    reason="clones the repo and runs `make demo` + `make test` from scratch (needs PyPI, ~1 h); "
    "set REPA_RUN_README_TEST=1 to run it",
)
def test_readme_setup_commands_work_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "repa"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    assert not (clone / ".venv").exists()
    commands = shell_commands((clone / "README.md").read_text())
    setup = [c for c in commands if c in SETUP_COMMANDS]
    assert setup == list(SETUP_COMMANDS), f"README.md set-up commands: {setup}"
    env = _clean_env(tmp_path)
    timeout = float(os.environ.get("REPA_README_TEST_TIMEOUT", 3 * 3600))
    for command in setup:
        log = tmp_path / f"{command.replace(' ', '-')}.log"
        with open(log, "w") as f:
            proc = subprocess.run(
                ["bash", "-c", command],
                cwd=clone,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        tail = log.read_text()[-6000:]
        assert proc.returncode == 0, (
            f"`{command}` exited {proc.returncode} in a fresh clone; log {log}:\n{tail}"
        )
        if command == "make demo":
            out = clone / "demo-output"
            assert (out / "samples-grid.png").exists() and list((out / "run" / "eval").glob("*/*.json")), tail
