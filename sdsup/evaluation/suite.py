"""The evaluation of a training workdir: every image variant its finished stages allow, plus the report.

Run by `python -m sdsup.evaluate --workdir=DIR` and, as the last stage
`evaluate` of a config (`sdsup.stages.evaluate`), at the end of `sdsup.train`. Settings come from
`config.evaluate` (split, examples, seed, clip_dir, variants), each
overridable from the command line.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax

from sdsup import pipelines, viz
from sdsup.data.dataset import Dataset
from sdsup.evaluation import clip_score, faithfulness, fid, images, report
from sdsup.workdir import Workdir

SPLITS = ("test", "validation")


def load_models(workdir: Workdir, control_dir: Optional[str] = None) -> images.Models:
    """The workdir's finished models for the variants; `control_dir` overrides its conditioner."""
    layout = workdir.layout_models() if workdir.is_done("layout") else None
    return images.Models(workdir.image_models(control_dir), layout)


def load_segmenter(workdir: Workdir, compiler_options: tuple = ()) -> images.Segmenter:
    """The evaluation segmenter of the workdir's `evalseg` stage."""
    workdir.require("evalseg")
    return images.Segmenter(*workdir.segmenter("evalseg"), compiler_options)


def sample_rows(rows: Sequence[dict]) -> list:
    return [{"caption": r["caption"], "panels": [r["layout"], r["image"], r["real"]]} for r in rows]


def inception_extractor(inception_dir: Optional[str], resize: str = "pytorch_fid"):
    """The standard FID feature network from a converted pytorch-fid file, or None (segmenter-feature FID only)."""
    if not inception_dir:
        return None
    return fid.inception_extractor(inception_dir, batch_size=32, resize=resize)


def faithfulness_metrics(prefix: str, scored: faithfulness.Scored) -> dict:
    return {f"{prefix}/{k}": float(v) for k, v in scored.summary().items()}


def faithfulness_examples(rows: dict, spec, count: int = 4):
    """caption | sampled layout | text_only image | text_layout_image image, each image with its facts ticked
    or crossed (the same captions and noise in both variants)."""
    grid = []
    for plain, generated in list(zip(rows["text_only"], rows["text_layout_image"]))[:count]:
        grid.append({"caption": plain["caption"],
                     "panels": [(generated["layout"], None), (plain["image"], plain["facts"]),
                                (generated["image"], generated["facts"])]})
    return viz.faithfulness_grid(grid, spec.class_names, spec.palette, spec.ignore_id)


def paired_faithfulness(scored: dict, baseline: str = "text_only") -> dict:
    """images/<variant>/faith_vs_<baseline>/{difference, ci_low, ci_high}: pooled fact accuracy of each
    variant minus the baseline's on the same captions, seeds and noise, with a 95% bootstrap interval."""
    out = {}
    if baseline not in scored:
        return out
    for v, s in scored.items():
        if v != baseline:
            d = faithfulness.paired_difference(s, scored[baseline])
            out.update({f"images/{v}/faith_vs_{baseline}/{k}": float(d[k]) for k in ("difference", "ci_low", "ci_high")})
    return out


def evaluate_workdir(workdir: Workdir, config, dataset: Dataset, settings: pipelines.Settings,
                     split: Optional[str] = None, num_examples: Optional[int] = None, seed: Optional[int] = None,
                     clip_dir: Optional[str] = None, variants: Optional[Sequence[str]] = None,
                     inception_dir: Optional[str] = None) -> dict:
    """Evaluates the workdir's models; merges metrics.json, writes pictures and report.md; returns the metrics."""
    cfg = config.get("evaluate", {})
    split = split or cfg.get("split", "test")
    if split not in SPLITS:
        raise images.EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
    num_examples = int(num_examples or cfg.get("examples", 128))
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    clip_dir = clip_dir or cfg.get("clip_dir")
    spec = dataset.spec
    models = load_models(workdir)
    evaluator = images.Evaluator(dataset, load_segmenter(workdir, settings.compiler_options), settings,
                                 full_frame=bool(cfg.get("full_frame", False)))
    allowed = models.available_variants()
    variants = list(variants or cfg.get("variants") or allowed)
    unknown = [v for v in variants if v not in images.VARIANTS]
    if unknown:
        raise images.EvaluationError(f"unknown variants {unknown}; known: {list(images.VARIANTS)}")
    missing = [v for v in variants if v not in allowed]
    if missing:
        raise images.EvaluationError(f"variants {missing} need stages this workdir has not finished (available: {allowed})")
    scorer = clip_score.ClipScorer.from_config_path(clip_dir)
    inception = inception_extractor(inception_dir or cfg.get("inception_dir"), cfg.get("fid_resize", "pytorch_fid"))
    metrics = {"images/real/miou": evaluator.real_image_miou(split, num_examples)}
    metrics["images/clip_skipped"] = float(scorer is None)
    for row, scored in evaluator.real_faithfulness(split, num_examples).items():
        metrics.update(faithfulness_metrics(f"images/{row}/faith", scored))
    out = workdir.stage_dir("evaluation", create=True)
    scored, rows = {}, {}
    for v in variants:
        result = evaluator.evaluate_variant(v, models, split=split, num_examples=num_examples, seed=seed,
                                            clip_scorer=scorer, inception=inception)
        metrics.update(images.flat_metrics(f"images/{v}", result))
        scored[v], rows[v] = result["faithfulness"], result["rows"]
        if "layout_faithfulness" in result:
            metrics.update(faithfulness_metrics(f"images/{v}/layout_faith", result["layout_faithfulness"]))
        metrics.update({f"images/{v}/iou/{c}": val for c, val in result["per_class_iou"].items()})
        if jax.process_index() == 0:
            viz.save_png(viz.captioned_grid(sample_rows(result["rows"]), spec.class_names, spec.palette,
                                            spec.ignore_id), os.path.join(out, f"samples_{v}.png"))
    metrics.update(paired_faithfulness(scored))
    if jax.process_index() == 0 and {"text_only", "text_layout_image"} <= set(rows):
        viz.save_png(faithfulness_examples(rows, spec), os.path.join(out, "faithfulness_examples.png"))
    if jax.process_index() == 0:
        report.merge_metrics(workdir.path, metrics)
        report.record_command(workdir.path, config, split=split, examples=num_examples, seed=seed)
        report.write_report(workdir.path, spec.class_names)
    return metrics
