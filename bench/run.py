"""Benchmarks: one JSON object per line.

  python bench/run.py                 # everything
  python bench/run.py --only=NAME     # one benchmark (comma-separated list allowed)
  python bench/run.py --list

Each `bench/bench_<topic>.py` module defines `BENCHMARKS`, a dict from name to
a function that returns one result dict with at least `name`, `value` and
`unit`, and where it has one a `baseline` measured *in the same run* (this
machine is noisy, so no number is compared with one taken earlier) and
`ratio` = value / baseline. Extra keys (goal, notes) are welcome; every line gets the
machine (CPU model and its AVX-512/AMX extensions) and this machine's float32
matmul peak, measured at the start of the run.
"""

import argparse
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_benchmarks():
    benchmarks = {}
    for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for bench_name, fn in module.BENCHMARKS.items():
            if bench_name in benchmarks:
                raise ValueError(f"benchmark {bench_name!r} is defined twice")
            benchmarks[bench_name] = fn
    return benchmarks


def cpu_model() -> str:
    """The CPU's model name and the matmul extensions that change its speed (machines differ between runs)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    extensions = [e for e, flag in (("avx512", "avx512f"), ("amx", "amx_tile")) if flag in flags]
    return name + (f" ({', '.join(extensions)})" if extensions else "")


# Timed in a child process: jax must not start its threads in this one before a benchmark configures malloc.
PEAK_PROGRAM = """
import time, jax, jax.numpy as jnp
n = 2048
a = jnp.ones((n, n), jnp.float32)
f = jax.jit(lambda x: x @ x)
f(a).block_until_ready()
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter(); f(a).block_until_ready(); best = min(best, time.perf_counter() - t0)
print(2 * n ** 3 / best / 1e9)
"""


def matmul_peak_gflops():
    """This machine's float32 matmul peak through XLA (best of 5 2048x2048 products), or None."""
    try:
        out = subprocess.run([sys.executable, "-c", PEAK_PROGRAM], capture_output=True, text=True, timeout=300)
        return round(float(out.stdout.strip().splitlines()[-1]), 1)
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--list", action="store_true", help="list benchmark names and exit")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    benchmarks = _load_benchmarks()
    if args.list:
        print("\n".join(benchmarks))
        return 0
    names = [n for n in args.only.split(",") if n] or list(benchmarks)
    unknown = [n for n in names if n not in benchmarks]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; known: {sorted(benchmarks)}", file=sys.stderr)
        return 2
    failed = 0
    peak = matmul_peak_gflops()
    for name in names:
        try:
            result = benchmarks[name]()
        except Exception as e:  # One broken benchmark must not hide the others.
            traceback.print_exc()
            result = {"name": name, "error": f"{type(e).__name__}: {e}"}
            failed += 1
        result.setdefault("name", name)
        result.setdefault("machine", machine())
        result.setdefault("matmul_peak_gflops", peak)
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
