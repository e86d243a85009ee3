"""One finished smoke run (`configs/scenes.py:smoke`) shared by every test file that needs it.

The run costs minutes on 2 cores, so it is built once per test session even across pytest-xdist
workers: the first worker to ask builds it under a file lock in the directory the workers share, the
others wait for it and reuse it. Tests treat it as read-only; a test that changes a workdir copies it
first (`copy_workdir`).
"""

import json
import os
import shutil
import subprocess
import sys

import filelock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = "configs/scenes.py:smoke"


def run_module(module, *args, timeout=900, env=None):
    """Runs `python -m module args` from the repository root, as a user would (own XLA flags)."""
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def build(root):
    """Returns (workdir, tfds data_dir) of a finished smoke run under `root`, building it if needed."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    workdir, data_dir = os.path.join(root, "wd"), os.path.join(root, "tfds")
    marker = os.path.join(root, "FINISHED.json")
    with filelock.FileLock(os.path.join(root, ".lock")):
        if os.path.exists(marker):
            failure = json.load(open(marker)).get("failure")
            if failure:
                raise AssertionError(f"the shared smoke run failed earlier in this session:\n{failure}")
            return workdir, data_dir
        result = run_module("sdsup.train", f"--config={SMOKE_CONFIG}", f"--workdir={workdir}",
                            f"--config.data.data_dir={data_dir}")
        failure = None if result.returncode == 0 else result.stderr[-4000:]
        with open(marker, "w") as f:
            json.dump({"failure": failure}, f)
        if failure:
            raise AssertionError(f"the smoke run failed:\n{failure}")
    return workdir, data_dir


def copy_workdir(workdir, destination):
    """A private copy of a finished workdir, for tests that change or damage it."""
    shutil.copytree(workdir, destination, symlinks=True)
    return destination
