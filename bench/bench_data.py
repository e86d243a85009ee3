"""Data benchmarks: building the default scenes dataset, input-pipeline throughput."""

import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from sdsup.data import pipeline, registry, scenes, tokenizers  # noqa: E402

# The default embedded run's dataset (configs/scenes.py).
DEFAULT = dict(name="scenes", image_size=64, seed=0, num_train=8000, num_validation=500, num_test=500)
_BUILT = {}


def _build(data_dir):
    config = ConfigDict(dict(DEFAULT, data_dir=data_dir))
    start = time.perf_counter()
    builder = registry.prepare(registry.SCENES, config)
    return builder, time.perf_counter() - start


def _default_builder():
    if "builder" not in _BUILT:
        _BUILT["dir"] = tempfile.mkdtemp(prefix="sdsup_bench_")
        _BUILT["builder"], _BUILT["seconds"] = _build(_BUILT["dir"])
    return _BUILT["builder"]


def scenes_build():
    """Seconds to build the default dataset (all splits, worker processes).

    Baseline: rendering the same examples in one process with no tfds writing,
    timed on 1,000 examples and scaled, so the ratio shows what parallel
    rendering and tfds' serialisation add or save.
    """
    _default_builder()
    seconds = _BUILT["seconds"]
    total = DEFAULT["num_train"] + DEFAULT["num_validation"] + DEFAULT["num_test"]
    start = time.perf_counter()
    for i in range(1000):
        scenes.make_example(1, "train", i, DEFAULT["image_size"])
    baseline = (time.perf_counter() - start) * total / 1000
    return {"name": "scenes_build", "value": round(seconds, 2), "unit": "s", "baseline": round(baseline, 2),
            "ratio": round(seconds / baseline, 3), "goal": "value < 60", "examples": total,
            "notes": "baseline = single-process rendering only, scaled from 1000 examples"}


def input_pipeline(seconds: float = 10.0):
    """Examples/s of the training pipeline at 64x64: shuffle, flip, tokenize, batch 64.

    Baseline: bare random-access reads of the same records (decoding only).
    """
    builder = _default_builder()
    source = registry.data_source(registry.SCENES, builder, "train")
    tok = tokenizers.WordTokenizer.scenes(64)
    it = iter(pipeline.train_dataset(source, tokenizer=tok, global_batch_size=64, seed=0,
                                     num_threads=2, prefetch=8))
    for _ in range(5):  # warm up threads and caches
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += next(it)["image"].shape[0]
    rate = n / (time.perf_counter() - start)
    order = np.random.default_rng(0).permutation(len(source))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 2:
        source[int(order[n % len(order)])]
        n += 1
    raw = n / (time.perf_counter() - start)
    return {"name": "input_pipeline", "value": round(rate, 1), "unit": "examples/s", "baseline": round(raw, 1),
            "ratio": round(rate / raw, 3), "goal": "value >= 2000",
            "notes": "baseline = bare record reads (decode only), one thread"}


def _cleanup():
    if "dir" in _BUILT:
        shutil.rmtree(_BUILT["dir"], ignore_errors=True)


import atexit  # noqa: E402

atexit.register(_cleanup)

BENCHMARKS = {"scenes_build": scenes_build, "input_pipeline": input_pipeline}
