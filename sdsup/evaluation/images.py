"""Image-level evaluation of a generator: image mIoU, segmenter-feature FID, CLIP score, sample rows.

A *variant* is one way of turning a split's examples into images:

  text_only          the text-conditional LDM alone (no layout);
  control            + the segmentation conditioner, fed the ground-truth layout;
  text_layout_image  the text -> layout model draws a layout from the caption,
                     and the conditioner turns it into an image.

For every example of the split (in order, the first `num_examples`) the
variant generates one image from the caption with a fixed seed. Then:

  image_miou    the evaluation segmenter (trained on real images only, never
                the discriminator) segments the image; confusion against the
                layout the image was conditioned on (the ground truth for
                text_only, whose "conditioning layout" is the one its caption
                describes; the generated map for text_layout_image);
  layout_miou   the same segmentation against the example's ground-truth map:
                how well the image's layout matches the prompt's real scene,
                end to end (equal to image_miou except for text_layout_image);
  fid_segfeat   Frechet distance between the generated and the real images of
                the split in the evaluation segmenter's feature space (the
                pooled outputs of every backbone stage, concatenated). For the
                scenes no pretrained Inception network exists offline, so this
                domain feature space stands in for FID's; it is NOT comparable
                with published FID numbers (see `sdsup.evaluation.fid` for the
                Inception-based FID of real datasets);
  clip_score    only with a local CLIP model (`evaluate.clip_dir`).

Everything runs on the host's first device with jitted functions cached in
`ctx.cache`, so evaluating several variants compiles each piece once.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sdsup import segmentation, stages
from sdsup.errors import SdsupError
from sdsup.data import pipeline, registry
from sdsup.evaluation import fid as fid_lib
from sdsup.models.segmenter import UperNetSegmenter
from sdsup.stages import common

VARIANTS = ("text_only", "control", "text_layout_image")


class EvaluationError(SdsupError):
    """An evaluation that the workdir or the arguments cannot support."""


@dataclasses.dataclass
class Generator:
    """What a variant needs: the finished LDM models, optionally a conditioner and a layout model.

    `ldm` holds {"unet", "text_encoder", "vae"} as (config, params);
    `controlnet` is (config, params, class table) or None; `layout` the
    layout stage's models (see `sdsup.stages.layout.load_models`) or None.
    """

    ldm: dict
    controlnet: Optional[tuple] = None
    layout: Optional[dict] = None
    control_unet: Optional[tuple] = None  # the UNet the control stage fine-tuned, if it did

    def without_conditioner(self) -> "Generator":
        """The text-only generator: the ldm stage's models alone."""
        return Generator(ldm=self.ldm, layout=self.layout)

    def images(self, ctx: stages.Context, tokens: np.ndarray, labels: Optional[np.ndarray], rng) -> np.ndarray:
        from sdsup.stages import control, ldm as ldm_stage
        from sdsup.models.clip_text import CLIPTextTransformer
        from sdsup.models.unet import UNet2DConditionModel
        from sdsup.models.vae import AutoencoderKL

        if labels is not None:
            if self.controlnet is None:
                raise ValueError("a layout was given but this generator has no conditioner")
            cn_config, cn_params, table = self.controlnet
            models = dict(self.ldm, controlnet=(cn_config, cn_params), table=table)
            if self.control_unet is not None:
                models["unet"] = self.control_unet
            return control.generate(ctx, tokens, labels, rng, models=models)
        (unet_config, unet_params), (text_config, text_params) = self.ldm["unet"], self.ldm["text_encoder"]
        vae_config, vae_params = self.ldm["vae"]
        return ldm_stage.generate(ctx, UNet2DConditionModel(unet_config), CLIPTextTransformer(text_config),
                                  AutoencoderKL(vae_config), {"unet": unet_params, "text_encoder": text_params},
                                  vae_params, ldm_stage.noise_schedule(ctx), jnp.asarray(tokens), rng)


def load_generator(ctx: stages.Context, controlnet_dir: Optional[str] = None) -> Generator:
    """The workdir's finished models; `controlnet_dir` (a control stage's directory, holding
    controlnet/ and class_table.npy) overrides the workdir's own conditioner."""
    import os

    from sdsup.models import io as model_io
    from sdsup.stages import ldm as ldm_stage, vae as vae_stage

    ldm = dict(ldm_stage.load(ctx), vae=vae_stage.load(ctx))
    controlnet, control_unet = None, None
    cdir = controlnet_dir or os.path.join(ctx.workdir, "control")
    if os.path.exists(os.path.join(cdir, "controlnet", model_io.CONFIG_FILE)):
        from sdsup.stages import control

        config, params, table, control_unet = control.load(ctx, cdir)
        controlnet = (config, params, table)
    layout = None
    if os.path.exists(stages.done_marker(ctx.workdir, "layout")):
        from sdsup.stages import layout as layout_stage

        layout = layout_stage.load_models(ctx)
    return Generator(ldm=ldm, controlnet=controlnet, layout=layout, control_unet=control_unet)


class EvalSegmenter:
    """The `evalseg` stage's segmenter: label maps and domain features of uint8 images."""

    def __init__(self, ctx: stages.Context):
        from sdsup.stages import evalseg

        self.config, self.variables = evalseg.load(ctx)
        seg = UperNetSegmenter(self.config)
        key = ("evalseg_fns", self.config)
        if key not in ctx.cache:
            def predict(v, images):
                x = common.images_to_float(images)
                return jnp.argmax(seg.apply(v, x, train=False), -1).astype(jnp.int32)

            def features(v, images):
                x = common.images_to_float(images)
                hidden = seg.apply(v, x, method=lambda m, x: m.backbone(m.normalize(x), False))
                # Every stage's pooled output: textures (early stages) as well as content (late ones).
                return jnp.concatenate([jnp.mean(h.astype(jnp.float32), axis=(1, 2)) for h in hidden[1:]], -1)

            ctx.cache[key] = (common.jit(predict, ctx), common.jit(features, ctx))
        self._predict, self._features = ctx.cache[key]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(self.variables, jnp.asarray(images)))

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._features(self.variables, jnp.asarray(images)), np.float64)


def real_feature_stats(ctx: stages.Context, segmenter: EvalSegmenter, split: str, num_examples: int,
                       batch_size: int = 32) -> fid_lib.FeatureStats:
    """Segmenter-feature statistics of the split's real images (cached per run in ctx.cache)."""
    key = ("real_stats", split, num_examples, segmenter.config)
    if key not in ctx.cache:
        spec, builder = common.dataset(ctx)
        stats = fid_lib.FeatureStats()
        for batch in pipeline.eval_batches(registry.data_source(spec, builder, split), tokenizer=common.tokenizer(ctx),
                                           global_batch_size=batch_size, limit=num_examples):
            stats.add(segmenter.features(batch["image"])[batch["mask"]])
        ctx.cache[key] = stats
    return ctx.cache[key]


def real_inception_stats(ctx: stages.Context, inception, split: str, num_examples: int,
                         batch_size: int = 32) -> fid_lib.FeatureStats:
    """Inception statistics of the split's real images (cached per run in ctx.cache)."""
    key = ("real_inception_stats", split, num_examples, inception.name)
    if key not in ctx.cache:
        spec, builder = common.dataset(ctx)
        batches = (b["image"][b["mask"]] for b in pipeline.eval_batches(
            registry.data_source(spec, builder, split), tokenizer=common.tokenizer(ctx), global_batch_size=batch_size,
            limit=num_examples))
        ctx.cache[key] = inception.accumulate(batches)
    return ctx.cache[key]


def evaluate_variant(ctx: stages.Context, variant: str, generator: Generator, segmenter: EvalSegmenter, *,
                     split: str = "test", num_examples: int = 128, seed: int = 0, batch_size: int = common.EVAL_BATCH,
                     clip_scorer=None, inception=None, keep_rows: int = 6) -> dict:
    """Metrics of one variant on a split; also `rows` (caption, layout, image) for sample grids.

    Returns {"image_miou", "layout_miou", "fid_segfeat", ["fid_inception"],
    ["clip_score"], "per_class_iou": {class: IoU or None}, "examples", "rows"}.
    `inception` is a `fid.FeatureExtractor` (e.g. `fid.inception_extractor`)
    for the standard FID of real datasets.
    """
    if variant not in VARIANTS:
        raise EvaluationError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant != "text_only" and generator.controlnet is None:
        raise EvaluationError(f"variant {variant!r} needs a trained conditioner (stage control)")
    if variant == "text_layout_image" and generator.layout is None:
        raise EvaluationError("variant 'text_layout_image' needs the text -> layout model (stage layout)")
    spec, builder = common.dataset(ctx)
    n = spec.num_classes
    source = registry.data_source(spec, builder, split)
    batch_size = min(batch_size, num_examples)  # no padded examples generated for nothing
    conf_cond = np.zeros((n, n), np.int64)
    conf_gt = np.zeros((n, n), np.int64)
    fake_stats, fake_inception = fid_lib.FeatureStats(), fid_lib.FeatureStats()
    clip_results = []
    rows: List[dict] = []
    count = 0
    for bi, batch in enumerate(pipeline.eval_batches(source, tokenizer=common.tokenizer(ctx),
                                                     global_batch_size=batch_size, limit=num_examples)):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), bi)
        keep, gt = batch["mask"], batch["label"]
        if variant == "text_only":
            cond = gt
            images = generator.images(ctx, batch["tokens"], None, rng)
        elif variant == "control":
            cond = gt
            images = generator.images(ctx, batch["tokens"], gt, rng)
        else:
            from sdsup.stages import layout as layout_stage

            cond = layout_stage.generate(ctx, generator.layout, batch["tokens"], jax.random.fold_in(rng, 7),
                                         mode="sample")
            images = generator.images(ctx, batch["tokens"], cond, rng)
        pred = segmenter.predict(images)
        conf_cond += segmentation.confusion_matrix(pred, cond, n, spec.ignore_id, mask=keep)
        conf_gt += segmentation.confusion_matrix(pred, gt, n, spec.ignore_id, mask=keep)
        fake_stats.add(segmenter.features(images)[keep])
        if inception is not None:
            fake_inception.add(inception(images[keep]))
        if clip_scorer is not None:
            clip_results.append(clip_scorer.score(images[keep], [c for c, k in zip(batch["caption"], keep) if k]))
        for j in np.nonzero(keep)[0]:
            if len(rows) < keep_rows:
                rows.append({"caption": batch["caption"][j], "layout": np.asarray(cond[j]), "image": images[j],
                             "real": batch["image"][j], "ground_truth": gt[j]})
        count += int(keep.sum())
    miou, iou = segmentation.iou_from_confusion(conf_cond)
    real = real_feature_stats(ctx, segmenter, split, num_examples, batch_size)
    result = {
        "image_miou": miou,
        "layout_miou": segmentation.iou_from_confusion(conf_gt)[0],
        "fid_segfeat": fid_lib.frechet_distance(*real.mu_sigma(), *fake_stats.mu_sigma()),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(spec.class_names, iou)},
        "examples": count,
        "rows": rows,
    }
    if inception is not None:
        real_i = real_inception_stats(ctx, inception, split, num_examples, batch_size)
        result["fid_inception"] = fid_lib.fid_from_stats(real_i, fake_inception)
    if clip_scorer is not None:
        from sdsup.evaluation.clip_score import ClipScoreResult

        result["clip_score"] = ClipScoreResult.concatenate(clip_results).score
    logging.info("evaluation %s on %s (%d examples): image mIoU %.3f, layout mIoU %.3f, FID(segfeat) %.2f",
                 variant, split, count, result["image_miou"], result["layout_miou"], result["fid_segfeat"])
    return result


def real_image_miou(ctx: stages.Context, segmenter: EvalSegmenter, split: str, num_examples: int,
                    batch_size: int = common.EVAL_BATCH) -> float:
    """The evaluation segmenter's mIoU on the split's REAL images: the ceiling of image mIoU."""
    batch_size = min(batch_size, num_examples)  # the variants' batch: one compiled segmenter
    spec, builder = common.dataset(ctx)
    conf = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    for batch in pipeline.eval_batches(registry.data_source(spec, builder, split), tokenizer=common.tokenizer(ctx),
                                       global_batch_size=batch_size, limit=num_examples):
        conf += segmentation.confusion_matrix(segmenter.predict(batch["image"]), batch["label"], spec.num_classes,
                                              spec.ignore_id, mask=batch["mask"])
    return segmentation.iou_from_confusion(conf)[0]


def flat_metrics(prefix: str, result: dict) -> Dict[str, float]:
    """{prefix/image_miou: ..., ...}: the scalar entries of `evaluate_variant`'s result."""
    return {f"{prefix}/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))}
