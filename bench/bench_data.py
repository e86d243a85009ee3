"""Data benchmarks: building the default scenes dataset, input-pipeline throughput (scenes at 64, real
files at 512)."""

import io
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import clip_vocab  # noqa: E402  (bench/ is on sys.path when run.py loads this module)
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


# ADE20K's images are mostly 683x512 (shorter side 512); ALDM stretches them to 512x512.
REAL_SHAPE, REAL_SIZE, REAL_IMAGES = (512, 683), 512, 192
REAL_BATCH = 16


def _photo_like(rng, shape):
    """A JPEG-able picture with a photo's frequency content (smooth regions, edges, fine texture) and a label
    map of regions following it, so files have realistic sizes and decode costs."""
    h, w = shape
    coarse = rng.random((6, 8, 3)) * 255
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC), float)
    image = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    label = (smooth.sum(-1) // 5).astype(np.uint8) % 151  # 0 = other, 1..150
    return image, label


def _write_ade20k(root, rng):
    """ADEChallengeData2016 laid out as shipped (JPEG images, PNG annotations), with a caption file."""
    captions = {}
    for split, sub, count in (("train", "training", REAL_IMAGES), ("validation", "validation", 4)):
        for kind in ("images", "annotations"):
            os.makedirs(os.path.join(root, "ADEChallengeData2016", kind, sub), exist_ok=True)
        for i in range(count):
            stem = f"ADE_{split[:5] if split == 'train' else 'val'}_{i + 1:08d}"
            image, label = _photo_like(rng, REAL_SHAPE)
            Image.fromarray(image).save(os.path.join(root, "ADEChallengeData2016", "images", sub, stem + ".jpg"),
                                        quality=90)
            Image.fromarray(label).save(os.path.join(root, "ADEChallengeData2016", "annotations", sub, stem + ".png"))
            captions[stem] = f"a photo of a room with a {['bed', 'lamp', 'window', 'table'][i % 4]} " \
                             f"and {i % 5 + 1} chairs next to a wall"
    with open(os.path.join(root, "captions.json"), "w") as f:
        json.dump(captions, f)
    return [(os.path.join(root, "ADEChallengeData2016", "images", "training", s + ".jpg"),
             os.path.join(root, "ADEChallengeData2016", "annotations", "training", s + ".png"), c)
            for s, c in captions.items() if s.startswith("ADE_train")]


def _rate(iterator, seconds):
    for _ in range(3):  # warm up: workers start, buffers fill
        next(iterator)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(iterator)["image"])
    return n / (time.perf_counter() - start)


def _tf_data(files, tok, seed):
    """The same work as plain tf.data: read, decode, resize (Lanczos-3 image, nearest label), flip,
    tokenize (the same CLIP tokenizer, in tf.numpy_function), shuffle and batch, parallel map AUTOTUNE."""
    images, labels, captions = (list(x) for x in zip(*files))

    def load(image_path, label_path, caption):
        image = tf.io.decode_jpeg(tf.io.read_file(image_path), channels=3)
        label = tf.io.decode_png(tf.io.read_file(label_path), channels=1)
        image = tf.image.resize(image, (REAL_SIZE, REAL_SIZE), method="lanczos3", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        label = tf.image.resize(label, (REAL_SIZE, REAL_SIZE), method="nearest")[..., 0]
        flip = tf.random.uniform(()) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
        tokens = tf.numpy_function(lambda c: tok.encode(c.decode("utf-8")), [caption], tf.int32)
        return {"image": image, "label": label, "tokens": tf.reshape(tokens, [tok.max_length])}

    ds = tf.data.Dataset.from_tensor_slices((images, labels, captions)).shuffle(len(images), seed=seed).repeat()
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(REAL_BATCH, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def input_pipeline_512(seconds: float = 15.0):
    """Examples/s at 512x512 from JPEG files: decode, resize, flip, CLIP-BPE tokenize, batch, on this host.

    sdsup: an ADE20K copy in its shipped layout (683x512 JPEGs, PNG annotations) built into array_record
    (`registry.prepare`, untimed: it happens once), read by the training pipeline with ALDM's geometry
    (stretched to 512x512, Lanczos; labels nearest), decoding in grain worker processes
    (`input.num_workers`; as many as cores) and, beside it, in threads of one process. Baseline: plain tf.data
    doing the same work on the same files in the same run (`_tf_data`). The value is the better sdsup setting;
    both are reported.
    """
    scratch = tempfile.mkdtemp(prefix="sdsup_bench512_")
    try:
        files = _write_ade20k(scratch, np.random.default_rng(0))
        tok_dir, vocabulary = clip_vocab.tokenizer_dir(scratch)
        tok = tokenizers.ClipTokenizer(tok_dir, 77)
        config = ConfigDict(dict(name="ade20k", data_dir=os.path.join(scratch, "tfds"), path=scratch,
                                 captions=os.path.join(scratch, "captions.json"), missing_captions="error",
                                 image_size=REAL_SIZE, validation_fraction=0.1, resize=(), resize_mode="stretch"))
        spec = registry.for_config(config)
        source = registry.data_source(spec, registry.prepare(spec, config), "train")
        geometry = pipeline.Geometry(REAL_SIZE)
        cores = os.cpu_count() or 1
        rates = {}
        for name, kw in (("workers", dict(num_workers=cores, num_threads=1)), ("threads", dict(num_threads=cores))):
            it = iter(pipeline.train_dataset(source, tokenizer=tok, global_batch_size=REAL_BATCH, seed=0,
                                             geometry=geometry, prefetch=2, **kw))
            try:
                rates[name] = _rate(it, seconds)
            finally:
                getattr(it, "close", lambda: None)()
        baseline = _rate(_tf_data(files, tok, 0), seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    value = max(rates.values())
    return {"name": "input_pipeline_512", "value": round(value, 1), "unit": "examples/s",
            "baseline": round(baseline, 1), "ratio": round(value / baseline, 3), "goal": "ratio >= 1.0",
            "workers": round(rates["workers"], 1), "threads": round(rates["threads"], 1),
            "tokenizer": vocabulary, "files": f"{REAL_IMAGES} JPEGs {REAL_SHAPE[1]}x{REAL_SHAPE[0]}",
            "notes": f"batch {REAL_BATCH}; baseline = tf.data (parallel map AUTOTUNE) on the same files"}


def _cleanup():
    if "dir" in _BUILT:
        shutil.rmtree(_BUILT["dir"], ignore_errors=True)


import atexit  # noqa: E402

atexit.register(_cleanup)

BENCHMARKS = {"scenes_build": scenes_build, "input_pipeline": input_pipeline, "input_pipeline_512": input_pipeline_512}
