"""Loading is safe: no load path in sdsup/ can run code hidden in a file.

The test reads every module under sdsup/ as a syntax tree (not as text, so
comments, docstrings and messages that mention pickle do not count) and
fails on

  * `numpy.load(..., allow_pickle=...)` with anything but False (numpy's
    default is False; a `**kwargs` call is refused since it cannot be seen),
  * any use of pickle or its relatives (pickle, cPickle, _pickle, dill,
    cloudpickle, joblib, shelve, marshal): importing them is enough,
  * `torch.load(...)` without `weights_only=True`,
  * `yaml.load` / `yaml.unsafe_load` (a config that builds objects),
  * `eval(...)` or `exec(...)` of anything.

Configs are Python files the user names (`--config=FILE`), run by importlib
on purpose; that is not a load of data and is not an eval/exec call.
"""

import ast
import concurrent.futures
import os
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sdsup")

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
CODE_RUNNERS = {"eval", "exec"}


def parse(source: str, name: str) -> ast.AST:
    """ast.parse on a fresh thread: CPython 3.11.7's AST builder can raise "recursion depth mismatch" when
    called deep in a long-lived test worker's stack (seen once in a full run, never alone)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(ast.parse, source, name).result()


class Finder(ast.NodeVisitor):
    """Collects the unsafe loads of one module: "line: what" strings."""

    def __init__(self):
        self.found: List[str] = []
        self.numpy = {"numpy"}  # names bound to the numpy module
        self.torch = {"torch"}
        self.yaml = {"yaml"}
        self.torch_load = set()  # names bound to torch.load itself (`from torch import load`)
        self.numpy_load = set()

    def _flag(self, node, what: str) -> None:
        self.found.append(f"{node.lineno}: {what}")

    def visit_Import(self, node):
        for alias in node.names:
            top = alias.name.split(".")[0]
            bound = alias.asname or top
            if top in PICKLE_MODULES:
                self._flag(node, f"import {alias.name}")
            for module, names in (("numpy", self.numpy), ("torch", self.torch), ("yaml", self.yaml)):
                if alias.name == module:
                    names.add(bound)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        top = (node.module or "").split(".")[0]
        if top in PICKLE_MODULES:
            self._flag(node, f"from {node.module} import ...")
        for alias in node.names:
            if alias.name in PICKLE_MODULES:
                self._flag(node, f"from {node.module} import {alias.name}")
            if node.module == "torch" and alias.name == "load":
                self.torch_load.add(alias.asname or "load")
            if node.module == "numpy" and alias.name == "load":
                self.numpy_load.add(alias.asname or "load")
            if node.module == "yaml" and alias.name in ("load", "unsafe_load"):
                self._flag(node, f"from yaml import {alias.name}")
        self.generic_visit(node)

    def _is(self, func, modules: set, name: str, direct: set) -> bool:
        if isinstance(func, ast.Attribute):
            return func.attr == name and isinstance(func.value, ast.Name) and func.value.id in modules
        return isinstance(func, ast.Name) and func.id in direct

    def visit_Call(self, node):
        func = node.func
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        hidden = any(k.arg is None for k in node.keywords)  # **kwargs: what they hold cannot be seen
        if isinstance(func, ast.Name) and func.id in CODE_RUNNERS:
            self._flag(node, f"{func.id}(...)")
        if self._is(func, self.numpy, "load", self.numpy_load):
            value = keywords.get("allow_pickle")
            if hidden or (value is not None and not (isinstance(value, ast.Constant) and value.value is False)):
                self._flag(node, "numpy.load with allow_pickle not False")
        if self._is(func, self.torch, "load", self.torch_load):
            value = keywords.get("weights_only")
            if hidden or not (isinstance(value, ast.Constant) and value.value is True):
                self._flag(node, "torch.load without weights_only=True")
        if isinstance(func, ast.Attribute) and func.attr in ("load", "unsafe_load", "load_all") and \
                isinstance(func.value, ast.Name) and func.value.id in self.yaml:
            self._flag(node, f"yaml.{func.attr}")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        # pickle reached without an import of its own, e.g. `pd.read_pickle` or `obj.__reduce__` tricks.
        if node.attr in ("read_pickle", "to_pickle"):
            self._flag(node, node.attr)
        self.generic_visit(node)


def unsafe_loads(source: str, name: str = "<source>") -> List[str]:
    finder = Finder()
    finder.visit(parse(source, name))
    return finder.found


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_no_module_under_sdsup_loads_unsafely():
    offenders = []
    for path in _modules():
        with open(path, encoding="utf-8") as f:
            found = unsafe_loads(f.read(), path)
        offenders += [f"{os.path.relpath(path, ROOT)}:{line}" for line in found]
    assert not offenders, "unsafe loads (pickle, eval/exec, torch.load without weights_only):\n" + \
        "\n".join(offenders)


def test_the_safe_loads_sdsup_makes_are_seen_and_pass():
    """The walk is not vacuous: sdsup does load .npy and PyTorch files, safely."""
    calls = {"numpy": 0, "torch": 0}
    for path in _modules():
        tree = parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "torch"):
                calls["numpy" if node.func.value.id == "np" else "torch"] += 1
    assert calls["numpy"] >= 3 and calls["torch"] >= 3, calls


@pytest.mark.parametrize("snippet, expected", [
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "numpy.load with allow_pickle not False"),
    ("import numpy\nnumpy.load(path, allow_pickle=flag)", "numpy.load with allow_pickle not False"),
    ("import numpy as onp\nonp.load(path, **options)", "numpy.load with allow_pickle not False"),
    ("from numpy import load\nload(path, allow_pickle=True)", "numpy.load with allow_pickle not False"),
    ("import pickle", "import pickle"),
    ("import cloudpickle as cp", "import cloudpickle"),
    ("from pickle import loads", "from pickle import ..."),
    ("from joblib import load", "from joblib import ..."),
    ("import torch\ntorch.load(path)", "torch.load without weights_only=True"),
    ("import torch as th\nth.load(path, weights_only=False)", "torch.load without weights_only=True"),
    ("from torch import load\nload(path)", "torch.load without weights_only=True"),
    ("import yaml\nyaml.load(text)", "yaml.load"),
    ("eval(open('f').read())", "eval(...)"),
    ("exec(code)", "exec(...)"),
    ("import pandas as pd\npd.read_pickle(path)", "read_pickle"),
])
def test_the_checker_finds_each_unsafe_form(snippet, expected):
    assert any(expected in found for found in unsafe_loads(snippet)), unsafe_loads(snippet)


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import numpy as np\nnp.load('x.npy')",
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "model.eval()\nsession.exec_plan()",
    "text = 'never eval( or pickle these'",
])
def test_the_checker_passes_safe_forms(snippet):
    assert unsafe_loads(snippet) == []
