"""Stage `data`: build (or verify) the dataset; write a preview and statistics."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sdsup import stages, viz
from sdsup.data import registry, scenes

# Statistics are taken over at most this many examples per split.
_STATS_EXAMPLES = 1000


def prepare_dataset(ctx: stages.Context):
    """The dataset's (spec, builder), built once per run and shared by stages."""
    if "dataset" not in ctx.cache:
        spec = registry.get(ctx.config.data.name)
        # Process 0 builds first so processes sharing a data_dir never race;
        # the others then find it built (or build their own local copy).
        if jax.process_index() == 0:
            builder = registry.prepare(spec, ctx.config.data)
        multihost_utils.sync_global_devices("dataset prepared")
        if jax.process_index() != 0:
            builder = registry.prepare(spec, ctx.config.data)
        ctx.cache["dataset"] = (spec, builder)
    return ctx.cache["dataset"]


def split_stats(spec, source) -> dict:
    n = min(len(source), _STATS_EXAMPLES)
    counts = np.zeros(256, np.int64)
    lengths, held_out = [], 0
    for i in range(n):
        record = source[i]
        counts += np.bincount(record["label"].ravel(), minlength=256)
        text = record[spec.caption_field]
        text = text.decode() if isinstance(text, bytes) else text
        lengths.append(len(text.split()))
        if "scene" in record:
            held_out += bool(scenes.facts(scenes.Scene.from_json(record["scene"])) & scenes.HELD_OUT)
    total = counts.sum()
    stats = {
        "examples": len(source),
        "examples_in_stats": n,
        "class_pixel_fraction": {name: round(float(counts[i] / total), 5) for i, name in enumerate(spec.class_names)},
        "ignore_pixel_fraction": round(float(counts[spec.ignore_id] / total), 5),
        "caption_words_mean": round(float(np.mean(lengths)), 2),
        "caption_words_max": int(np.max(lengths)),
    }
    if spec.name == "scenes":
        stats["examples_with_held_out_composition"] = held_out
    return stats


@stages.register("data")
def run(ctx: stages.Context) -> dict:
    spec, builder = prepare_dataset(ctx)
    out = ctx.stage_dir("data")
    summary = {"dataset": spec.name, "data_dir": str(builder.data_dir), "splits": {}}
    for split in spec.splits:
        summary["splits"][split] = split_stats(spec, registry.data_source(spec, builder, split))
    if jax.process_index() == 0:
        source = registry.data_source(spec, builder, "train")
        rows = []
        for i in range(min(ctx.config.preview_examples, len(source))):
            r = source[i]
            text = r[spec.caption_field]
            rows.append({"caption": text.decode() if isinstance(text, bytes) else text,
                         "panels": [r["image"], r["label"]]})
        grid = viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id,
                                  scale=max(1, 128 // ctx.config.data.image_size))
        viz.save_png(grid, os.path.join(out, "preview.png"))
        with open(os.path.join(out, "stats.json"), "w") as f:
            json.dump(summary, f, indent=2)
    for split, s in summary["splits"].items():
        logging.info("data: %s has %d examples", split, s["examples"])
    return summary
