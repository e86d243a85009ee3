"""Stage `data`: build (or verify) the dataset; write a preview and statistics."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from sdsup import viz
from sdsup.data import pipeline
from sdsup.stages import common

NAME = "data"
# Statistics are taken over at most this many examples per split.
_STATS_EXAMPLES = 1000


def split_stats(spec, source) -> dict:
    n = min(len(source), _STATS_EXAMPLES)
    counts = np.zeros(256, np.int64)
    images_with = np.zeros(256, np.int64)
    lengths, extra = [], {}
    for i in range(n):
        record = source[i]
        per_image = np.bincount(pipeline.decode_label(record["label"]).ravel(), minlength=256)
        counts += per_image
        images_with += per_image > 0
        lengths.append(len(pipeline.text(record[spec.caption_field]).split()))
        if spec.record_stats is not None:
            for key, value in spec.record_stats(record).items():
                extra[key] = extra.get(key, 0) + value
    total = counts.sum()
    stats = {
        "examples": len(source),
        "examples_in_stats": n,
        "class_pixel_fraction": {name: round(float(counts[i] / total), 5) for i, name in enumerate(spec.class_names)},
        "images_per_class": {name: int(images_with[i]) for i, name in enumerate(spec.class_names)},
        "ignore_pixel_fraction": round(float(counts[spec.ignore_id] / total), 5),
        "caption_words_mean": round(float(np.mean(lengths)), 2),
        "caption_words_max": int(np.max(lengths)),
    }
    stats.update(extra)
    return stats


def run(ctx: common.Context) -> dict:
    dataset = ctx.dataset
    spec = dataset.spec
    out = ctx.stage_dir(NAME)
    summary = {"dataset": spec.name, "data_dir": str(dataset.builder.data_dir), "splits": {}}
    for split in spec.splits:
        summary["splits"][split] = split_stats(spec, dataset.source(split))
    if jax.process_index() == 0:
        source = dataset.source("train")
        rows = []
        for i in range(min(ctx.config.preview_examples, len(source))):
            r = source[i]
            # Real files decoded and resized, whole frames (Cityscapes' 1:2 included); the scenes as they are.
            image, label = ctx.dataset.geometry.apply(r["image"], r["label"], None, crop=False)
            rows.append({"caption": pipeline.text(r[spec.caption_field]), "panels": [image, label]})
        grid = viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id,
                                  scale=max(1, 128 // ctx.config.data.image_size))
        viz.save_png(grid, os.path.join(out, "preview.png"))
        with open(os.path.join(out, "stats.json"), "w") as f:
            json.dump(summary, f, indent=2)
    for split, s in summary["splits"].items():
        logging.info("data: %s has %d examples", split, s["examples"])
    return summary
