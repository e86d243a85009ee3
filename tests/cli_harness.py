"""Runs sdsup's command-line entry points as a user would, in this process or as a real process.

`call_in_process(name, argv)` runs `python -m <module> argv` inside the test
process (absl's `app.run` with the module's flags, or the argparse
`main(argv)`), capturing stderr and the exit status, at no import cost;
`call_subprocess` starts the real thing. `tree_hashes` fingerprints files to
show that nothing changed; `block_real_work` makes a call that gets past its
checks fail at once instead of training or sampling for minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import signal
import sys
import traceback
from typing import Sequence

import jax
from absl import flags

import smoke_workdir
from sdsup import caption, cli, evaluate, pipelines, sample, stages, train
from sdsup.convert import __main__ as convert_main
from sdsup.convert import inception as convert_inception
from sdsup.evaluation import suite
from sdsup.experiments import ablation
from sdsup.stages import common
from sdsup.trainer import preemption

TRACEBACK = "Traceback (most recent call last)"
JAX_SETTINGS = ("jax_compilation_cache_dir", "jax_platforms")

ABSL_ENTRY_POINTS = {
    # name: (module, flags parser); train brings its own parser (config-aware); the others use cli's default
    "train": (train, getattr(train, "_parse_flags", None)),
    "sample": (sample, None),
    "evaluate": (evaluate, None),
    "ablation": (ablation, None),
}
ARGPARSE_ENTRY_POINTS = {"convert": convert_main.main, "inception": convert_inception.main, "caption": caption.main}
MODULES = {"train": "sdsup.train", "sample": "sdsup.sample", "evaluate": "sdsup.evaluate", "ablation":
           "sdsup.experiments.ablation", "convert": "sdsup.convert", "inception": "sdsup.convert.inception",
           "caption": "sdsup.caption"}
ENTRY_POINTS = set(ABSL_ENTRY_POINTS) | set(ARGPARSE_ENTRY_POINTS)


@dataclasses.dataclass
class Outcome:
    status: int
    stderr: str
    escaped: str = ""  # the traceback of an exception that left the entry point (a real user would see it)


def _exit_status(code) -> tuple:
    """(status, message) as the interpreter turns SystemExit(code) into them."""
    if code is None:
        return 0, ""
    if isinstance(code, int):
        return code, ""
    return 1, f"{code}\n"


def call_in_process(name: str, argv: Sequence[str]) -> Outcome:
    """The entry point `name` run in this process with `argv`, as `python -m` runs it."""
    err = io.StringIO()
    defined_before = set(flags.FLAGS)
    argv_before = sys.argv
    sigterm_before = signal.getsignal(signal.SIGTERM)
    # sdsup.train installs the process's SIGTERM policy (a watcher thread that exits the process with the
    # retry status): in a test worker it would outlive the call and end the worker at the next SIGTERM any
    # later test sends itself. The policy has its own tests, in processes of their own (tests/test_faults.py).
    install_policy = preemption.exit_on_sigterm
    preemption.exit_on_sigterm = lambda: None
    # The entry points point JAX at their compilation cache (config.jax_cache_dir) and, for conversions, at the
    # CPU: the test process keeps its own settings.
    jax_before = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
    # config_flags reads its --config.KEY=VALUE overrides from sys.argv itself, whatever app.run was given.
    sys.argv = [MODULES[name], *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if name in ABSL_ENTRY_POINTS:
                module, parser = ABSL_ENTRY_POINTS[name]
                cli.run(module.main, module.define_flags, flags_parser=parser, argv=[MODULES[name], *argv])
                status = 0
            else:
                status = ARGPARSE_ENTRY_POINTS[name](list(argv))
    except SystemExit as e:
        status, message = _exit_status(e.code)
        err.write(message)
    except BaseException:  # what a user would get as a traceback
        return Outcome(status=1, stderr=err.getvalue(), escaped=traceback.format_exc())
    finally:
        sys.argv = argv_before
        preemption.exit_on_sigterm = install_policy
        signal.signal(signal.SIGTERM, sigterm_before)
        for name, value in jax_before.items():
            if getattr(jax.config, name) != value:
                jax.config.update(name, value)
        # config_flags loads every config file as module "config_config" and re-executes the next file in the
        # same module object: an earlier file's get_config would survive into a file that has none.
        sys.modules.pop("config_config", None)
        # The entry point's flags were defined for this call only (sdsup.cli.run defines them when it runs);
        # drop them so the next call can define its own.
        for flag in set(flags.FLAGS) - defined_before:
            delattr(flags.FLAGS, flag)
    return Outcome(status=status, stderr=err.getvalue())


def call_subprocess(name: str, argv: Sequence[str]) -> Outcome:
    result = smoke_workdir.run_module(MODULES[name], *argv, timeout=300,
                                      env={k: v for k, v in os.environ.items() if k != "SDSUP_DEBUG"})
    return Outcome(status=result.returncode, stderr=result.stderr)


def tree_hashes(*roots: str) -> dict:
    """{path: sha256 of its bytes (a directory: "dir"; unreadable: its size and mode)} for everything under roots."""
    out = {}
    for root in roots:
        if not root or not os.path.lexists(root):
            continue
        if os.path.isfile(root):
            out[root] = _file_hash(root)
            continue
        for folder, dirs, files in os.walk(root):
            out[folder] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                out[path] = _file_hash(path)
    return out


# sha256 of files already read, by (path, size, mtime, inode): the shared smoke workdir is fingerprinted before and
# after every row that reads it, and a file that was written since has another mtime (or size, or inode).
_HASHES: dict = {}


def _file_hash(path: str) -> str:
    if os.path.islink(path):
        return "link:" + os.readlink(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHES:
        try:
            with open(path, "rb") as f:
                _HASHES[key] = hashlib.sha256(f.read()).hexdigest()
        except OSError:  # a file made unreadable on purpose: its size and mode stand for it
            _HASHES[key] = f"unreadable:{st.st_size}:{st.st_mode}"
    return _HASHES[key]


def last_line(outcome: Outcome) -> str:
    lines = outcome.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def assert_clear_error(outcome: Outcome, message: str, label: str = "") -> str:
    """A non-zero exit, no traceback, and a last stderr line "error: ..." holding `message`; returns that line."""
    assert not outcome.escaped, f"{label}: an exception reached the user:\n{outcome.escaped}"
    assert TRACEBACK not in outcome.stderr, f"{label}: a traceback on stderr:\n{outcome.stderr[-3000:]}"
    assert outcome.status != 0, f"{label}: exit status 0\n{outcome.stderr[-2000:]}"
    last = last_line(outcome)
    assert last.startswith("error: "), f"{label}: last stderr line {last!r}\n{outcome.stderr[-2000:]}"
    assert message in last, f"{label}: {message!r} not in {last!r}"
    return last


class ReachedTheWork(AssertionError):
    """A row got past every check to the real work (training, sampling, evaluation, loading BLIP)."""


# What the entry points do after their checks: the stages, sampling, evaluation, loading BLIP; and inside a stage,
# its step's compile.
REAL_WORK = ((stages, "run_all"), (pipelines, "text_to_image"), (pipelines, "layout_to_image"),
             (pipelines, "text_to_layout"), (suite, "evaluate_workdir"), (caption, "_load_blip"),
             (common, "compile_step"))


def block_real_work(monkeypatch, allow: Sequence[str] = ()) -> None:
    """Replaces the real work (`REAL_WORK`, except the names in `allow`) by a ReachedTheWork failure."""
    def reached(*args, **kwargs):
        raise ReachedTheWork("the bad input was not caught before the real work started")
    for module, name in REAL_WORK:
        if name not in allow:
            monkeypatch.setattr(module, name, reached)
