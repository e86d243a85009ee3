"""Evaluation of the text -> layout stage: mIoU against ground truth, baselines, relations, report.

Per split (test = held-out compositions, validation), over the first
`layout.eval_examples` examples, at the image resolution (predictions are
upsampled nearest-neighbour), ignore id excluded, one confusion matrix per
method over the whole split:

  map        the most probable map (per-pixel argmax of the all-masked pass)
  sample     confidence-ordered unmasking; mean and std over `layout.eval_seeds` seeds
  majority   the per-pixel most frequent training class (no text)
  retrieval  the map of the training example whose caption is nearest (TF-IDF cosine)
  oracle     the ground truth at the model's resolution, upsampled (the ceiling of the resolution)

Where the dataset states its captions' relations (`DatasetSpec.caption_relations`,
the scenes do), relation accuracy: the share of relations the captions state
("a car left of the tree", "a sun above the house") that the map's class
centroids satisfy (a class missing from the map fails its relations).

Where the dataset states its captions' facts (`DatasetSpec.caption_facts`), on
the first split: the share of them the maps hold (`sdsup.evaluation.faithfulness`,
read off the maps as off a segmenter's), for the most probable map, the first
seed's sampled maps and retrieval, as `<stage>/faith_<method>/<metric>`.

Merges its numbers into `WORKDIR/metrics.json` (per-class IoU as
`layout/iou_<method>/<class>`) and rebuilds `WORKDIR/report.md`
(`sdsup.evaluation.report`), with pictures under `WORKDIR/layout/`. Run by the
`layout` stage at its end, on the models it just trained.
"""

from __future__ import annotations

import collections
import os
from typing import Dict, List, Sequence

import jax
import numpy as np
from absl import logging

from sdsup import model_configs, pipelines, segmentation, viz
from sdsup.data import pipeline
from sdsup.data.dataset import Dataset
from sdsup.diffusion import masked
from sdsup.evaluation import faithfulness, report
from sdsup.evaluation.images import EVAL_BATCH
from sdsup.workdir import Workdir

SPLITS = (("test", ""), ("validation", "/val"))


# ----------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------
def _words(caption: str) -> List[str]:
    return [w for w in caption.lower().replace(".", " ").replace(",", " ").split() if w]


class CaptionIndex:
    """Nearest training caption by TF-IDF cosine over words (the retrieval baseline)."""

    def __init__(self, captions: Sequence[str]):
        vocab: Dict[str, int] = {}
        docs = [collections.Counter(_words(c)) for c in captions]
        for d in docs:
            for w in d:
                vocab.setdefault(w, len(vocab))
        df = np.zeros(len(vocab))
        for d in docs:
            for w in d:
                df[vocab[w]] += 1
        self.vocab, self.idf = vocab, np.log((1 + len(docs)) / (1 + df)) + 1.0
        self.matrix = self._vectors(docs)

    def _vectors(self, docs) -> np.ndarray:
        m = np.zeros((len(docs), len(self.vocab)), np.float32)
        for i, d in enumerate(docs):
            for w, n in d.items():
                if w in self.vocab:
                    m[i, self.vocab[w]] = n * self.idf[self.vocab[w]]
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-8)

    def nearest(self, captions: Sequence[str]) -> np.ndarray:
        q = self._vectors([collections.Counter(_words(c)) for c in captions])
        return np.argmax(q @ self.matrix.T, axis=1)


def majority_map(labels: np.ndarray, num_classes: int, ignore_id: int) -> np.ndarray:
    """[H, W]: the most frequent class at each pixel over the maps [N, H, W]."""
    pixels = int(np.prod(labels.shape[1:]))
    flat = labels.reshape(len(labels), pixels).astype(np.int64)
    where = np.broadcast_to(np.arange(pixels), flat.shape)
    valid = flat != ignore_id
    counts = np.bincount(where[valid] * num_classes + flat[valid], minlength=pixels * num_classes)
    return np.argmax(counts.reshape(labels.shape[1:] + (num_classes,)), axis=-1).astype(np.int32)


def oracle_map(labels: np.ndarray, factor: int, num_classes: int, ignore_id: int) -> np.ndarray:
    low = masked.downsample_labels(jax.numpy.asarray(labels), factor, num_classes, ignore_id)
    return masked.upsample_labels(np.asarray(low), factor)


# ----------------------------------------------------------------------------
# Relations.
# ----------------------------------------------------------------------------
def relation_holds(label_map: np.ndarray, a: int, relation: str, b: int) -> bool:
    """Whether class a's centroid is `relation` (left of / right of / above / below) class b's."""
    ya, xa = np.nonzero(label_map == a)
    yb, xb = np.nonzero(label_map == b)
    if len(xa) == 0 or len(xb) == 0:
        return False
    if relation == "left of":
        return xa.mean() < xb.mean()
    if relation == "right of":
        return xa.mean() > xb.mean()
    if relation == "above":
        return ya.mean() < yb.mean()
    if relation == "below":
        return ya.mean() > yb.mean()
    raise ValueError(f"unknown relation {relation!r}")


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------
def _miou(confusion: np.ndarray) -> float:
    return float(segmentation.iou_from_confusion(confusion)[0])


def _train_reference(dataset: Dataset, limit: int):
    """(captions, label maps) of the first `limit` training examples (retrieval and majority)."""
    source = dataset.source("train")
    n = min(limit, len(source))
    records = [source[i] for i in range(n)]
    captions = [pipeline.text(r[dataset.spec.caption_field]) for r in records]
    # As the evaluation sees them: real datasets' files decoded and cropped (the scenes' arrays as they are).
    labels = np.stack([dataset.geometry.apply(r["image"], r["label"], None)[1] for r in records])
    return captions, labels


def eval_batch_size(config) -> int:
    """The evaluation's batch; the stage's sample grid uses it too, so the samplers compile once."""
    return min(EVAL_BATCH, int(config.layout.eval_examples))


def evaluate(config, workdir: Workdir, dataset: Dataset, models: dict, settings: pipelines.Settings,
             stage: str = "layout") -> dict:
    """Metrics of the layout model `models` (keys `<stage>/...`); writes metrics.json, report.md and pictures
    (in the stage's directory).

    `models` is {"layout": (config, params), "text_encoder": (config, params)} and, for the planner stage's
    planned maps, "planner" (`pipelines.text_to_layout`).
    """
    cfg = config.layout
    spec = dataset.spec
    n, ignore = spec.num_classes, spec.ignore_id
    factor = model_configs.layout_factor(config)
    train_captions, train_labels = _train_reference(dataset, int(cfg.get("reference_examples", 4000)))
    index = CaptionIndex(train_captions)
    majority = majority_map(train_labels, n, ignore)
    seeds = int(cfg.eval_seeds)
    batch_size = eval_batch_size(config)
    best_map = settings.layout_sampling(mode="map")
    metrics: Dict[str, float] = {}
    per_class = {}
    examples_for_report = None
    calibration = faithfulness.calibrate(dataset) if spec.caption_facts is not None else None
    faith_methods = ("map", "sample0", "retrieval")

    splits = [(split, suffix) for split, suffix in SPLITS if split in spec.splits]
    for split, suffix in splits:
        source = dataset.source(split)
        methods = ["map", "majority", "retrieval", "oracle"] + [f"sample{s}" for s in range(seeds)]
        conf = {m: np.zeros((n, n), np.int64) for m in methods}
        rel_hits = {m: 0 for m in methods}
        rel_total = 0
        scored = {m: faithfulness.Scored() for m in faith_methods}
        for bi, batch in enumerate(dataset.eval_batches(split, batch_size, limit=int(cfg.eval_examples))):
            labels, keep = batch["label"], batch["mask"]
            preds = {
                "map": pipelines.text_to_layout(models, batch["tokens"], jax.random.PRNGKey(0), settings, best_map),
                "majority": np.broadcast_to(majority, labels.shape),
                "retrieval": train_labels[index.nearest(batch["caption"])],
                "oracle": oracle_map(labels, factor, n, ignore),
            }
            for s in range(seeds):
                rng = jax.random.fold_in(jax.random.PRNGKey(1000 + s), bi)
                preds[f"sample{s}"] = pipelines.text_to_layout(models, batch["tokens"], rng, settings)
            for m, p in preds.items():
                conf[m] += segmentation.confusion_matrix(p, labels, n, ignore, mask=keep)
            if spec.caption_relations is not None:
                for j in np.nonzero(keep)[0]:
                    rels = spec.caption_relations(source[int(batch["index"][j])])
                    rel_total += len(rels)
                    for m, p in preds.items():
                        rel_hits[m] += sum(relation_holds(p[j], spec.class_names.index(a), r,
                                                          spec.class_names.index(b)) for a, r, b in rels)
            if calibration is not None and split == splits[0][0]:
                for j in np.nonzero(keep)[0]:
                    stated = faithfulness.facts_of(spec, source[int(batch["index"][j])], batch["caption"][j])
                    for m in faith_methods:
                        scored[m].add(faithfulness.MapReader(preds[m][j], calibration, spec.class_names), stated,
                                      spec.thing_classes)
            if split == splits[0][0] and examples_for_report is None:  # the report's split: test where there is one
                examples_for_report = (batch, preds)
        sample_mious = [_miou(conf[f"sample{s}"]) for s in range(seeds)]
        metrics.update({
            f"{stage}/miou_map{suffix}": _miou(conf["map"]),
            f"{stage}/miou_sample_mean{suffix}": float(np.mean(sample_mious)),
            f"{stage}/miou_sample_std{suffix}": float(np.std(sample_mious)),
            f"{stage}/miou_majority{suffix}": _miou(conf["majority"]),
            f"{stage}/miou_retrieval{suffix}": _miou(conf["retrieval"]),
            f"{stage}/miou_oracle{suffix}": _miou(conf["oracle"]),
        })
        if rel_total:
            metrics[f"{stage}/relation_accuracy{suffix}"] = rel_hits["map"] / rel_total
            metrics[f"{stage}/relation_accuracy_sample_mean{suffix}"] = float(np.mean(
                [rel_hits[f"sample{s}"] / rel_total for s in range(seeds)]))
            metrics[f"{stage}/relation_accuracy_retrieval{suffix}"] = rel_hits["retrieval"] / rel_total
            metrics[f"{stage}/relation_accuracy_oracle{suffix}"] = rel_hits["oracle"] / rel_total
            metrics[f"{stage}/relations{suffix}"] = rel_total
        if calibration is not None and split == splits[0][0]:
            for m in faith_methods:
                name = "sample" if m == "sample0" else m
                metrics.update({f"{stage}/faith_{name}/{k}": v for k, v in scored[m].summary().items()})
        per_class[split] = {m: segmentation.iou_from_confusion(conf[m])[1] for m in ("map", "sample0", "retrieval")}
        logging.info("%s %s: mIoU map %.3f, sample %.3f +- %.3f, retrieval %.3f, majority %.3f, oracle %.3f",
                     stage, split, metrics[f"{stage}/miou_map{suffix}"], metrics[f"{stage}/miou_sample_mean{suffix}"],
                     metrics[f"{stage}/miou_sample_std{suffix}"], metrics[f"{stage}/miou_retrieval{suffix}"],
                     metrics[f"{stage}/miou_majority{suffix}"], metrics[f"{stage}/miou_oracle{suffix}"])

    if jax.process_index() == 0:
        _write(workdir, dataset, settings, metrics, per_class, examples_for_report, models, stage)
    return metrics


def _write(workdir: Workdir, dataset: Dataset, settings: pipelines.Settings, metrics: dict, per_class: dict,
           examples, models, stage: str) -> None:
    spec = dataset.spec
    out = workdir.stage_dir(stage, create=True)
    batch, preds = examples
    rows = [{"caption": batch["caption"][j],
             "panels": [batch["label"][j], preds["map"][j], preds["sample0"][j], preds["sample1" if "sample1" in preds
                                                                                    else "sample0"][j],
                        preds["retrieval"][j]]}
            for j in range(min(8, len(batch["caption"])))]
    viz.save_png(viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id),
                 os.path.join(out, "report_test.png"))
    if spec.novel_prompts:
        # 8 prompts: they share the evaluation's compiled sampler only when its batch is 8 too (smoke).
        prompts = list(spec.novel_prompts)
        tokens = np.stack([dataset.tokenizer.encode(p) for p in prompts])
        best = pipelines.text_to_layout(models, tokens, jax.random.PRNGKey(0), settings,
                                        settings.layout_sampling(mode="map"))
        sampled = pipelines.text_to_layout(models, tokens, jax.random.PRNGKey(7), settings)
        viz.save_png(viz.captioned_grid([{"caption": p, "panels": [m, s]} for p, m, s in zip(prompts, best, sampled)],
                                        spec.class_names, spec.palette, spec.ignore_id),
                     os.path.join(out, "report_novel.png"))

    per_class_metrics = {}
    first = next(iter(per_class))  # test where the dataset has one
    for method, key in (("map", "map"), ("sample0", "sample"), ("retrieval", "retrieval")):
        for c, name in enumerate(spec.class_names):
            per_class_metrics[f"{stage}/iou_{key}/{name}"] = float(per_class[first][method][c])
    report.merge_metrics(workdir.path, dict(metrics, **per_class_metrics))
    report.write_report(workdir.path)
