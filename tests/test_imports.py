"""The package's import structure: every sdsup import at module level, and no cycle between modules.

An import of an sdsup module inside a function usually hides a cycle; the
layers are meant to be visible (errors, data, diffusion, models at the bottom;
trainer, workdir, pipelines, aldm, evaluation above; stages; the entry
points on top). The only function-level imports allowed are those that
defer a heavy third-party package on purpose (torch, transformers, the tfds
builders): each carries a `# deferred:` comment that says why.
(Standard-library imports belong at module level too.)
"""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sdsup")


def _modules():
    """{module name: path} of every module under sdsup/."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _imported(node, module: str, is_package: bool):
    """The sdsup modules an Import/ImportFrom node names (a package's submodule when `from pkg import sub`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "sdsup"]
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        parts = module.split(".")
        parent = parts if is_package else parts[:-1]
        parent = parent[:len(parent) - node.level + 1]
        base = ".".join(parent + ([node.module] if node.module else []))
    if base.split(".")[0] != "sdsup":
        return []
    names = [f"{base}.{a.name}" for a in node.names]
    return [n if n in MODULES else base for n in names]


def _graph():
    """{module: set of sdsup modules it imports at module level}, and the function-level imports found."""
    graph, nested = {}, []
    for module, path in MODULES.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        lines = open(path, encoding="utf-8").read().splitlines()
        is_package = path.endswith("__init__.py")
        edges = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported(node, module, is_package))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        nested.append((module, inner.lineno, lines[inner.lineno - 1].strip(),
                                       bool(_imported(inner, module, is_package))))
        graph[module] = {e for e in edges if e != module}
    return graph, nested


def test_no_sdsup_import_inside_a_function():
    """Except a module whose import pulls in a heavy third-party package (tfds), deferred on purpose and saying so."""
    _, nested = _graph()
    offenders = [f"{m}:{line}: {text}" for m, line, text, is_sdsup in nested if is_sdsup and "# deferred:" not in text]
    assert not offenders, "sdsup imports inside functions (hoist them; a cycle is a design problem):\n" + \
        "\n".join(offenders)


def test_deferred_third_party_imports_say_why():
    _, nested = _graph()
    silent = [f"{m}:{line}: {text}" for m, line, text, is_sdsup in nested if "# deferred:" not in text]
    assert not silent, "function-level imports need a `# deferred: <why>` comment:\n" + "\n".join(silent)


def test_the_module_import_graph_is_acyclic():
    graph, _ = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_evaluation_does_not_import_the_training_stages():
    graph, _ = _graph()
    seen, todo = set(), [m for m in graph if m.startswith("sdsup.evaluation")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    assert not [m for m in seen if m.startswith("sdsup.stages")]


def test_every_module_imports_and_the_entry_points_import_together():
    """One fresh interpreter imports the CLIs together (their flags are defined only when run) and then every
    module, each in its own `importlib` call, so that one that fails is named."""
    program = "\n".join([
        "import importlib, sys",
        "import sdsup.train, sdsup.sample, sdsup.evaluate, sdsup.convert",
        "bad = []",
        f"for name in {sorted(MODULES)!r}:",
        "    try:",
        "        importlib.import_module(name)",
        "    except Exception as e:",
        "        bad.append(f'{name}: {type(e).__name__}: {e}')",
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)",
    ])
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
