"""Memory over a long run: resident memory of `sdsup.train` over 2,000 steps of a tiny stage (issue 24).

  memory_2000_steps   the smoke config's `ldm` stage (UNet + text encoder on the frozen VAE's latents,
                      the grain pipeline, metrics every 10 steps, an asynchronous checkpoint every 100
                      steps, two kept) trained for 2,000 steps; the process's resident set (VmRSS) is
                      read at every logged step. value: growth in percent from the warm median (steps
                      400-600: compiled, the sample grid's sampler compiled in the background and its
                      memory returned, checkpoints written and deleted) to the median of the last 200
                      steps (medians: a sample taken while a checkpoint is copied out reads high); goal < 5.

The stage needs a finished `vae`: the benchmark first trains data and vae
(`--only=data,vae`) in a fresh workdir. tests/test_faults_extended.py runs
`measure_memory` on a copy of the test session's smoke run instead.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = "configs/scenes.py:smoke"
LOGGED_STEP = re.compile(r"\] \[(\d+)\] steps_per_sec=")


def _train_command(workdir: str, data_dir: str, *flags: str) -> list:
    return [sys.executable, "-m", "sdsup.train", f"--config={SMOKE_CONFIG}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *flags]


def _environment() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's shell has
    return env


def resident_mib(pid: int) -> float:
    """VmRSS of process `pid` in MiB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def measure_memory(workdir: str, data_dir: str, steps: int = 2000, warm_from: int = 400, window: int = 200,
                   timeout_s: float = 3600) -> dict:
    """Trains the `ldm` stage of a workdir whose `vae` finished for `steps` steps; RSS at each logged step.

    Returns {"growth_percent", "rss_warm_mib", "rss_last_mib", "rss_max_mib", "samples": [(step, MiB)], ...}.
    """
    command = _train_command(workdir, data_dir, "--only=ldm", f"--config.ldm.num_steps={steps}",
                             "--config.ldm.log_every=10", "--config.ldm.checkpoint_every=100",
                             "--config.ldm.keep_checkpoints=2")
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    samples, tail = [], []
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    try:
        for line in process.stderr:
            tail = (tail + [line])[-40:]
            match = LOGGED_STEP.search(line)
            if match:
                try:
                    samples.append((int(match.group(1)), resident_mib(process.pid)))
                except (OSError, RuntimeError):  # the process just ended
                    pass
        process.wait()
    finally:
        timer.cancel()
    if process.returncode != 0:
        raise RuntimeError(f"sdsup.train exited with {process.returncode}:\n{''.join(tail)}")
    warm = statistics.median(rss for step, rss in samples if warm_from <= step <= warm_from + window)
    last = statistics.median(rss for step, rss in samples if step > steps - window)
    return {"growth_percent": round(100 * (last - warm) / warm, 2), "rss_warm_mib": round(warm, 1),
            "rss_last_mib": round(last, 1), "rss_max_after_warm_up_mib": round(max(r for s, r in samples
                                                                                  if s >= warm_from), 1),
            "steps": steps, "warm_steps": [warm_from, warm_from + window], "samples": samples,
            "seconds": round(time.perf_counter() - start, 1)}


def memory_2000_steps() -> dict:
    root = tempfile.mkdtemp(prefix="sdsup_bench_memory_")
    try:
        workdir, data_dir = os.path.join(root, "wd"), os.path.join(root, "tfds")
        prepared = subprocess.run(_train_command(workdir, data_dir, "--only=data,vae"), cwd=ROOT, env=_environment(),
                                  capture_output=True, text=True)
        if prepared.returncode != 0:
            raise RuntimeError(f"data and vae stages failed:\n{prepared.stderr[-3000:]}")
        result = measure_memory(workdir, data_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    samples = result.pop("samples")
    return {"name": "memory_2000_steps", "value": result["growth_percent"], "unit": "% RSS growth after warm-up",
            "goal": "< 5", **result, "rss_every_200_steps": [(s, round(r, 1)) for s, r in samples if s % 200 == 0]}


BENCHMARKS = {"memory_2000_steps": memory_2000_steps}
