"""Package layout: no import cycles among repa's modules, counting lazy imports inside functions.

A cycle works at import time only by luck of order (or because one side imports lazily) and ties two
modules into one job; the eval stack (stats <- images <- features <- refstats <- metrics) is layered
so that each can be read and tested on its own. The graph is read from the source with ``ast``, so
every ``import repa...`` / ``from repa... import`` counts, wherever it sits: module level, inside a
function, or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import repa

PACKAGE_DIR = Path(repa.__file__).resolve().parent


def module_files(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is a package __init__)}`` for every module of a package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imports_of(name: str, path: Path, is_package: bool, modules: dict) -> set[str]:
    """The package's modules that ``name`` imports.

    ``from pkg import x`` names the submodule ``pkg.x`` when there is one, else ``pkg`` itself (its
    ``__init__``). Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit
    parent imports are not edges (else every package that re-exports its submodules would be a
    cycle), but an explicit ``from a.b import Name`` is one.
    """
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: one level is the current package
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``."""
    modules = module_files(package_dir)
    return {name: imports_of(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.sub import b\n",
        "a.py": "import os\n\ndef f():\n    import pkg.sub.b as B\n",
        "sub/__init__.py": "",
        "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",
        "sub/c.py": "from ..a import f\nfrom pkg import NAME\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        "pkg": {"pkg.sub.b"},
        "pkg.a": {"pkg.sub.b"},  # lazy, inside a function; os is not the package's
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.sub.c"},  # relative, under TYPE_CHECKING
        "pkg.sub.c": {"pkg.a", "pkg"},  # `from pkg import NAME` runs pkg/__init__
    }
    assert find_cycle(graph) == ["pkg", "pkg.sub.b", "pkg.sub.c", "pkg"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_eval_stack_is_layered():
    # stats and images know nothing of networks or each other; features no files of statistics.
    graph = import_graph()
    eval_deps = {name: {d for d in deps if d.startswith("repa.eval")} for name, deps in graph.items()}
    assert eval_deps["repa.eval.errors"] == set()
    assert eval_deps["repa.eval.stats"] == {"repa.eval.errors"}
    assert eval_deps["repa.eval.images"] == {"repa.eval.errors"}
    assert eval_deps["repa.eval.inception"] == set()  # sFID's layer: a hook, no statistics, no files
    assert eval_deps["repa.eval.dinov2"] == {"repa.eval.errors"}
    assert eval_deps["repa.eval.features"] == {
        "repa.eval.errors",
        "repa.eval.images",
        "repa.eval.inception",
        "repa.eval.stats",
    }
    assert "repa.eval.metrics" not in eval_deps["repa.eval.refstats"]


def test_train_and_eval_sit_beside_each_other_on_the_shared_floor():
    """Neither verb's package imports the other; the services both use import neither."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("repa.eval"):
            assert not {d for d in deps if d.startswith("repa.train")}, f"{name} imports the trainer"
        if name.startswith("repa.train"):
            assert not {d for d in deps if d.startswith("repa.eval")}, f"{name} imports the evaluator"
    floor = ["repa.storage", "repa.runtime", "repa.checkpoint", "repa.tensorboard", "repa.config"]
    for name in floor:
        assert not {d for d in graph[name] if d.startswith(("repa.train", "repa.eval", "repa.data"))}, name


def test_loading_validating_and_showing_a_config_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, io, contextlib\n"
        "from repa.config import load_config\n"
        "load_config('sit-xl-2-repa', ['encoder.names=[dinov2-vit-l, timm:vit_small_patch14_dinov2]',"
        " 'encoder.weights_urls=[]'])"
        ".validate()\n"
        "from repa.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['config', 'show', '--config', 'sit-xl-2-repa']) == 0\n"
        "    watch = ['--for', 'watch', '--set', 'storage.run_url=s3://b/r']\n"
        "    watch += ['--set', 'model.allow_random_weights=true']\n"
        "    assert main(['config', 'validate', '--config', 'sit-b-2-repa', *watch]) == 0\n"
        "    assert main(['config', 'schema']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'numpy', 'fsspec', 'diffusers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_cluster_wing_is_one_package_with_one_api_client_loader():
    """kube, status, logs, launch, jobs and eval_job live in repa/cluster/; only ``kube`` loads a
    kubeconfig or the in-cluster config, the trainer never imports the wing, and the evaluator only its
    Job launcher (``repa watch --launch-jobs``)."""
    graph = import_graph()
    wing = {m for m in graph if m.startswith("repa.cluster.")}
    assert wing == {f"repa.cluster.{m}" for m in ("kube", "status", "logs", "launch", "jobs", "eval_job")}
    for old in (
        "repa.kube",
        "repa.status",
        "repa.logs",
        "repa.launch",
        "repa.eval.jobs",
        "repa.eval.eval_job",
    ):
        assert old not in graph, f"{old} is back outside repa/cluster/"
    loaders = sorted(
        name
        for name, (path, _) in module_files(PACKAGE_DIR).items()
        if "load_kube_config" in path.read_text() or "load_incluster_config" in path.read_text()
    )
    assert loaders == ["repa.cluster.kube"]
    for name, deps in graph.items():
        cluster_deps = {d for d in deps if d.startswith("repa.cluster")}
        if name.startswith("repa.train"):
            assert not cluster_deps, f"{name} imports the cluster wing"
        if name.startswith("repa.eval"):
            assert cluster_deps <= {"repa.cluster.jobs"}, f"{name} imports {cluster_deps}"
    assert not {d for d in graph["repa.cluster.kube"] if d.startswith("repa.")}, "kube is the wing's floor"


def test_the_checkpoint_package_is_layered_and_models_are_plain_nn():
    """store (commit, verify, quarantine, retention) <- model (which SiT a file holds); the saver stands
    alone; nothing in the package reaches up to a verb; repa.models imports no checkpoint code."""
    graph = import_graph()
    parts = ("repa.checkpoint.store", "repa.checkpoint.saver", "repa.checkpoint.model")
    package = {name: {d for d in graph[name] if d.startswith("repa.checkpoint")} for name in parts}
    assert package == {
        "repa.checkpoint.store": set(),
        "repa.checkpoint.saver": set(),
        "repa.checkpoint.model": {"repa.checkpoint.store"},
    }
    for name in parts:
        assert not {d for d in graph[name] if d.startswith(("repa.train", "repa.eval", "repa.data"))}, name
    for name, deps in graph.items():
        if name.startswith("repa.models"):
            assert not {d for d in deps if d.startswith("repa.checkpoint")}, f"{name} imports checkpoint code"
    assert not (PACKAGE_DIR / "models" / "reference.py").exists()


def test_the_trainer_is_a_loop_over_components():
    """trainer.py <= 500 lines, its loop body <= 20; the components import neither the trainer nor each
    other (stops may use the saver and the lease it is given)."""
    train = PACKAGE_DIR / "train"
    source = (train / "trainer.py").read_text()
    assert len(source.splitlines()) <= 500
    loop = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "_loop"
    )
    assert loop.end_lineno - loop.body[0].lineno + 1 <= 20
    graph = import_graph()
    components = ("repa.train.checkpointer", "repa.train.stops", "repa.train.metrics", "repa.train.inputs")
    for name in components:
        assert not {d for d in graph[name] if d in (*components, "repa.train.trainer")}, name
