"""Whole runs of `python -m sdsup.train`: wall time, each stage's time and step compile time, peak RSS.

  smoke_run       configs/scenes.py:smoke from a cold compilation cache (goal: <= 180 s, issue 4)
  default_run     configs/scenes.py, the embedded default (goal: <= 30 minutes for the whole pipeline)
  smoke_ablation  `sdsup.experiments.ablation` on configs/scenes.py:smoke, one seed, from nothing
                  (shared stages, both conditioners, evaluation, report; goal: <= 300 s, issue 6)

Each run gets a fresh workdir and an empty XLA compilation cache (so compile
times are the real, cold ones); the dataset itself comes from the usual tfds
directory (built once, then reused: building is `scenes_build`'s subject).
Peak RSS is the child process's maximum resident set (getrusage).
With SDSUP_BENCH_KEEP=DIR the run's workdir (DIR/<name>/run) is kept, e.g. to
reuse the default run for the ablation (`--from_workdir`).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from sdsup.evaluation import report
from sdsup.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage_times(path: str) -> tuple:
    """({stage: seconds}, {stage: step compile seconds}) of the stages trained in the workdir at `path`."""
    workdir = Workdir(path)
    stages, compiles = {}, {}
    for stage in workdir.config().stages:
        # Links are an ablation run's shared stages, counted where they were trained.
        if os.path.islink(workdir.stage_dir(stage)) or not workdir.is_done(stage):
            continue
        done = workdir.summary(stage)
        stages[stage] = done.get("seconds")
        if "compile_s" in done:
            compiles[stage] = done["compile_s"]
    return stages, compiles


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _train_results(workdir: str) -> tuple:
    """(stage seconds, step compile seconds, metrics) of a `sdsup.train` workdir."""
    stages, compiles = _stage_times(workdir)
    metrics = {k: v for k, v in report.read_metrics(workdir).items() if "/iou" not in k}
    return stages, compiles, metrics


def _ablation_results(workdir: str) -> tuple:
    """The same for an ablation: shared stages once, then one conditioner per (variant, seed)."""
    stages, compiles = _stage_times(os.path.join(workdir, "shared"))
    for run in sorted(os.listdir(os.path.join(workdir, "runs"))):
        run_stages, run_compiles = _stage_times(os.path.join(workdir, "runs", run))
        stages.update({f"{run}/{k}": v for k, v in run_stages.items()})
        compiles.update({f"{run}/{k}": v for k, v in run_compiles.items()})
    return stages, compiles, _read_json(os.path.join(workdir, "ablation.json")).get("target", {})


def _run(config_arg: str, goal_s: float, name: str, module: str = "sdsup.train", args: tuple = (),
         results=_train_results) -> dict:
    keep = os.environ.get("SDSUP_BENCH_KEEP")
    if keep:
        tmp = os.path.join(os.path.abspath(keep), name)
        if os.path.exists(tmp):
            raise RuntimeError(f"SDSUP_BENCH_KEEP: {tmp} exists; the run must start from nothing")
        os.makedirs(tmp)
    else:
        tmp = tempfile.mkdtemp(prefix=f"sdsup_bench_{name}_")
    try:
        workdir, cache = os.path.join(tmp, "run"), os.path.join(tmp, "jax_cache")
        config = "configs/scenes.py" + (f":{config_arg}" if config_arg else "")
        cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
               f"--config.jax_cache_dir={cache}", *args]
        log = os.path.join(tmp, "log.txt")
        start = time.perf_counter()
        with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the child
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code:
            with open(log) as f:
                raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {f.read()[-2000:]}")
        stages, compiles, metrics = results(workdir)
        return {"name": name, "value": round(wall, 1), "unit": "s", "goal": f"value <= {goal_s:.0f}",
                "stage_s": stages, "step_compile_s": compiles, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                "metrics": metrics, "config": config + ", cold compilation cache, dataset prebuilt",
                "load_average": os.getloadavg()}
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


BENCHMARKS = {
    "smoke_run": lambda: _run("smoke", 180, "smoke_run"),
    "default_run": lambda: _run("", 1800, "default_run"),
    "smoke_ablation": lambda: _run("smoke", 300, "smoke_ablation", module="sdsup.experiments.ablation",
                                   args=("--seeds=1",), results=_ablation_results),
}
