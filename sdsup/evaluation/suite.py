"""The evaluation of a training workdir: every image variant its finished stages allow, plus the report.

Run by `python -m sdsup.evaluate --workdir=DIR` and, as the last stage
`evaluate` of a config, at the end of `sdsup.train`. Settings come from
`config.evaluate` (split, examples, seed, clip_dir, variants), each
overridable from the command line.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax

from sdsup import stages, viz
from sdsup.evaluation import images, report
from sdsup.stages import common

SPLITS = ("test", "validation")


def available_variants(generator: images.Generator) -> list:
    out = ["text_only"]
    if generator.controlnet is not None:
        out.append("control")
        if generator.layout is not None:
            out.append("text_layout_image")
    return out


def clip_scorer(clip_dir: Optional[str]):
    """A CLIP scorer from a local directory, or None with a notice (the report says CLIP score was skipped)."""
    from sdsup.evaluation import clip_score

    return clip_score.ClipScorer.from_config_path(clip_dir)


def sample_rows(rows: Sequence[dict]) -> list:
    return [{"caption": r["caption"], "panels": [r["layout"], r["image"], r["real"]]} for r in rows]


def inception_extractor(inception_dir: Optional[str]):
    """The standard FID feature network from a converted pytorch-fid file, or None (segmenter-feature FID only)."""
    if not inception_dir:
        return None
    from sdsup.evaluation import fid

    return fid.inception_extractor(inception_dir, batch_size=32)


def evaluate_workdir(ctx: stages.Context, split: Optional[str] = None, num_examples: Optional[int] = None,
                     seed: Optional[int] = None, clip_dir: Optional[str] = None,
                     variants: Optional[Sequence[str]] = None, inception_dir: Optional[str] = None) -> dict:
    """Evaluates the workdir's models; merges metrics.json, writes pictures and report.md; returns the metrics."""
    cfg = ctx.config.get("evaluate", {})
    split = split or cfg.get("split", "test")
    if split not in SPLITS:
        raise images.EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
    num_examples = int(num_examples or cfg.get("examples", 128))
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    clip_dir = clip_dir or cfg.get("clip_dir")
    spec, _ = common.dataset(ctx)
    generator = images.load_generator(ctx)
    segmenter = images.EvalSegmenter(ctx)
    allowed = available_variants(generator)
    variants = list(variants or cfg.get("variants") or allowed)
    unknown = [v for v in variants if v not in images.VARIANTS]
    if unknown:
        raise images.EvaluationError(f"unknown variants {unknown}; known: {list(images.VARIANTS)}")
    missing = [v for v in variants if v not in allowed]
    if missing:
        raise images.EvaluationError(f"variants {missing} need stages this workdir has not finished (available: {allowed})")
    scorer = clip_scorer(clip_dir)
    inception = inception_extractor(inception_dir or cfg.get("inception_dir"))
    metrics = {"images/real/miou": images.real_image_miou(ctx, segmenter, split, num_examples)}
    metrics["images/clip_skipped"] = float(scorer is None)
    out = ctx.stage_dir("evaluation")
    for v in variants:
        with common.timed(f"evaluation: {v}"):
            result = images.evaluate_variant(ctx, v, generator, segmenter, split=split, num_examples=num_examples,
                                             seed=seed, clip_scorer=scorer, inception=inception)
        metrics.update(images.flat_metrics(f"images/{v}", result))
        metrics.update({f"images/{v}/iou/{c}": val for c, val in result["per_class_iou"].items()})
        if jax.process_index() == 0:
            viz.save_png(viz.captioned_grid(sample_rows(result["rows"]), spec.class_names, spec.palette,
                                            spec.ignore_id), os.path.join(out, f"samples_{v}.png"))
    if jax.process_index() == 0:
        report.merge_metrics(ctx.workdir, metrics)
        report.record_command(ctx.workdir, ctx.config, split=split, examples=num_examples, seed=seed)
        report.write_report(ctx.workdir, spec.class_names)
    return metrics


@stages.register("evaluate")
def run(ctx: stages.Context) -> dict:
    metrics = evaluate_workdir(ctx)
    return {k: v for k, v in metrics.items() if "/iou/" not in k}

