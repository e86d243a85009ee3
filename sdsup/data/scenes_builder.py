"""The synthetic scenes as a tfds dataset, written as array_record for grain.

Built offline in seconds from `sdsup.data.scenes`; every example is a pure
function of (seed, split, index), so the same config always builds the same
dataset, whatever the number of worker processes.
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures.process import BrokenProcessPool
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from sdsup.data import scenes

_DESCRIPTION = """Procedural synthetic scenes (sdsup's embedded default): RGB
images, per-pixel class maps with an ignore id, and captions from a documented
grammar. The test split holds compositions never seen in train."""


class ScenesConfig(tfds.core.BuilderConfig):
    """Image size, seed and split sizes; the name encodes all of them."""

    def __init__(self, *, image_size: int = 64, seed: int = 0, num_train: int = 8000,
                 num_validation: int = 500, num_test: int = 500):
        for key, value, low in (("image_size", image_size, 8), ("num_train", num_train, 1),
                                ("num_validation", num_validation, 1), ("num_test", num_test, 1),
                                ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"scenes {key} must be an integer >= {low}, got {value!r}")
        name = f"s{image_size}_seed{seed}_n{num_train}_{num_validation}_{num_test}"
        super().__init__(name=name, description=f"{image_size}x{image_size} scenes, seed {seed}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.split_sizes = {"train": int(num_train), "validation": int(num_validation), "test": int(num_test)}


class SdsupScenes(tfds.core.GeneratorBasedBuilder):
    """Synthetic scenes: image, label map, caption, scene program (JSON)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # The default embedded run and its smoke version (configs/scenes.py).
    BUILDER_CONFIGS = [ScenesConfig(),
                       ScenesConfig(image_size=32, num_train=512, num_validation=64, num_test=64)]
    # Worker processes used to render; 0 renders in this process.
    num_workers = min(4, os.cpu_count() or 1)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        raw = tfds.features.Encoding.BYTES
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=raw),
                "label": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=raw),
                "caption": tfds.features.Text(),
                "scene": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            metadata=tfds.core.MetadataDict(
                class_names=list(scenes.CLASS_NAMES),
                palette=scenes.PALETTE.tolist(),
                ignore_id=scenes.IGNORE_ID,
                held_out=sorted(list(f) for f in scenes.HELD_OUT),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is procedural.
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.split_sizes.items()}

    def _generate_examples(self, split: str, num_examples: int):
        cfg = self.builder_config
        chunk = 128
        jobs = [(cfg.seed, split, a, min(a + chunk, num_examples), cfg.image_size)
                for a in range(0, num_examples, chunk)]
        # Worker start-up (~1 s) only pays for itself on larger splits.
        if self.num_workers <= 1 or num_examples < 2048:
            yield from _keyed(map(scenes.make_examples, jobs), jobs)
            return
        # 'spawn' because TensorFlow's threads are already running in this
        # process, and forking a process with live threads can deadlock.
        # Workers import only NumPy and sdsup.data.scenes, not TF or tfds.
        ctx = multiprocessing.get_context("spawn")
        yielded = False
        try:
            with concurrent.futures.ProcessPoolExecutor(self.num_workers, mp_context=ctx) as pool:
                for item in _keyed(pool.map(scenes.make_examples, jobs), jobs):
                    yielded = True
                    yield item
        except BrokenProcessPool:
            if yielded:
                raise
            # E.g. a __main__ that cannot be re-imported (stdin, some notebooks).
            logging.warning("scenes: worker processes failed to start; rendering in this process")
            yield from _keyed(map(scenes.make_examples, jobs), jobs)


def _keyed(chunks, jobs):
    for examples, (_, _, start, _, _) in zip(chunks, jobs):
        for offset, ex in enumerate(examples):
            index = start + offset
            yield index, dict(ex, index=index)
