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

With `full_frame` (`evaluate.full_frame`) every example is evaluated on its
whole resized frame instead of the centred `data.image_size` crop: ALDM's
Cityscapes protocol (512x1024). The image generators sample that frame
directly (they are convolutional); a text -> layout map, square, is
stretched to it (nearest neighbour).

Everything runs host-local with jitted functions cached per process (the
samplers in `sdsup.pipelines`, the segmenter's here), so evaluating several
variants compiles each piece once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sdsup import model_configs, pipelines, segmentation
from sdsup.conditioning import images_to_float
from sdsup.data.dataset import Dataset
from sdsup.errors import SdsupError
from sdsup.evaluation import faithfulness
from sdsup.evaluation import fid as fid_lib
from sdsup.evaluation.clip_score import ClipScoreResult

VARIANTS = ("text_only", "control", "text_layout_image")
# Batch of the evaluations (images and layouts): larger batches use the cores better.
EVAL_BATCH = 32
# Ground-truth training maps that calibrate the faithfulness check's object reading (sizes, pairs).
CALIBRATION_EXAMPLES = 512


class EvaluationError(SdsupError):
    """An evaluation that the workdir or the arguments cannot support."""


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    """What the variants need: the image models (conditioner optional) and the text -> layout models (optional)."""

    images: pipelines.ImageModels
    layout: Optional[dict] = None

    def available_variants(self) -> list:
        out = ["text_only"]
        if self.images.has_conditioner:
            out.append("control")
            if self.layout is not None:
                out.append("text_layout_image")
        return out


class Segmenter:
    """A trained segmenter (the evaluation segmenter; a UperNet, or an imported DRN or Segformer): label maps and
    domain features of uint8 images."""

    def __init__(self, config, variables, compiler_options: tuple = ()):
        self.config, self.variables = config, variables
        self._predict, self._features = _segmenter_fns(config, compiler_options)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(self.variables, jnp.asarray(images)))

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._features(self.variables, jnp.asarray(images)), np.float64)


@functools.lru_cache(maxsize=8)
def _segmenter_fns(config, compiler_options: tuple):
    seg = model_configs.segmenter_network(config)
    options = dict(compiler_options) or None

    def predict(v, images):
        x = images_to_float(images)
        return jnp.argmax(seg.apply(v, x, train=False), -1).astype(jnp.int32)

    def features(v, images):
        return seg.apply(v, images_to_float(images), all_stages=True, method=type(seg).pooled_features)

    return jax.jit(predict, compiler_options=options), jax.jit(features, compiler_options=options)


def real_miou(dataset: Dataset, predict, split: str, num_examples: Optional[int] = None,
              batch_size: int = EVAL_BATCH, full_frame: bool = False) -> dict:
    """{"miou", "per_class_iou"} of `predict(uint8 images) -> class ids` on a split's REAL images.

    Over the dataset's classes: the ceiling of image mIoU for the evaluation
    segmenter, the sanity check of a discriminator (`predict` then drops its
    "fake" output).
    """
    spec = dataset.spec
    confusion = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    for batch in dataset.eval_batches(split, batch_size, limit=num_examples, full_frame=full_frame):
        confusion += segmentation.confusion_matrix(np.asarray(predict(batch["image"])), batch["label"],
                                                   spec.num_classes, spec.ignore_id, mask=batch["mask"])
    miou, iou = segmentation.iou_from_confusion(confusion)
    return {"miou": miou, "per_class_iou": {n: (None if np.isnan(v) else float(v))
                                            for n, v in zip(spec.class_names, iou)}}


class Evaluator:
    """Scores the variants' images on a dataset's split; real-image statistics are computed once."""

    def __init__(self, dataset: Dataset, segmenter: Segmenter, settings: pipelines.Settings,
                 full_frame: bool = False):
        self.dataset, self.segmenter, self.settings, self.full_frame = dataset, segmenter, settings, full_frame
        self._real: dict = {}
        self._calibration: Optional[faithfulness.Calibration] = None

    @property
    def calibration(self) -> faithfulness.Calibration:
        """The faithfulness check's object geometry, from the train split's ground-truth maps (once)."""
        if self._calibration is None:
            self._calibration = faithfulness.calibrate(self.dataset, CALIBRATION_EXAMPLES, EVAL_BATCH, self.full_frame)
        return self._calibration

    def _reader(self, label, image=None) -> faithfulness.MapReader:
        return faithfulness.MapReader(label, self.calibration, self.dataset.spec.class_names, image=image)

    def real_faithfulness(self, split: str, num_examples: int,
                          batch_size: int = EVAL_BATCH) -> Dict[str, faithfulness.Scored]:
        """{"ground_truth", "real"}: the facts of each caption that hold in its ground-truth map (the check's
        own ceiling) and in the evaluation segmenter's reading of its real image."""
        key = ("faith", split, num_examples)
        if key not in self._real:
            spec, source = self.dataset.spec, self.dataset.source(split)
            scored = {"ground_truth": faithfulness.Scored(), "real": faithfulness.Scored()}
            batch_size = min(batch_size, num_examples)  # the variants' batch: one compiled segmenter
            for batch in self._batches(split, batch_size, num_examples):
                pred = self.segmenter.predict(batch["image"])
                for j in np.nonzero(batch["mask"])[0]:
                    facts = faithfulness.facts_of(spec, source[int(batch["index"][j])], batch["caption"][j])
                    scored["ground_truth"].add(self._reader(batch["label"][j], batch["image"][j]), facts,
                                               spec.thing_classes)
                    scored["real"].add(self._reader(pred[j], batch["image"][j]), facts, spec.thing_classes)
            self._real[key] = scored
        return self._real[key]

    def _batches(self, split: str, batch_size: int, num_examples: int):
        return self.dataset.eval_batches(split, batch_size, limit=num_examples, full_frame=self.full_frame)

    def real_feature_stats(self, split: str, num_examples: int, batch_size: int = 32) -> fid_lib.FeatureStats:
        """Segmenter-feature statistics of the split's real images."""
        key = ("segfeat", split, num_examples)
        if key not in self._real:
            stats = fid_lib.FeatureStats()
            for batch in self._batches(split, batch_size, num_examples):
                stats.add(self.segmenter.features(batch["image"])[batch["mask"]])
            self._real[key] = stats
        return self._real[key]

    def real_inception_stats(self, inception, split: str, num_examples: int,
                             batch_size: int = 32) -> fid_lib.FeatureStats:
        """Inception statistics of the split's real images."""
        key = ("inception", inception.name, split, num_examples)
        if key not in self._real:
            batches = (b["image"][b["mask"]] for b in self._batches(split, batch_size, num_examples))
            self._real[key] = inception.accumulate(batches)
        return self._real[key]

    def real_image_miou(self, split: str, num_examples: int, batch_size: int = EVAL_BATCH) -> float:
        """The evaluation segmenter's mIoU on the split's REAL images: the ceiling of image mIoU."""
        batch_size = min(batch_size, num_examples)  # the variants' batch: one compiled segmenter
        return real_miou(self.dataset, self.segmenter.predict, split, num_examples, batch_size,
                         self.full_frame)["miou"]

    def evaluate_variant(self, variant: str, models: Models, *, split: str = "test", num_examples: int = 128,
                         seed: int = 0, batch_size: int = EVAL_BATCH, clip_scorer=None, inception=None,
                         keep_rows: int = 6) -> dict:
        """Metrics of one variant on a split; also `rows` (caption, layout, image) for sample grids.

        Returns {"image_miou", "layout_miou", "fid_segfeat", ["fid_inception"],
        ["clip_score"], "per_class_iou": {class: IoU or None}, "examples", "rows",
        "faithfulness": the per-caption facts that hold in the segmenter's reading of each image (a
        `faithfulness.Scored`; its summary also as "faith/<metric>"), and for text_layout_image
        "layout_faithfulness": the same for the sampled layouts themselves}.
        `inception` is a `fid.FeatureExtractor` (e.g. `fid.inception_extractor`)
        for the standard FID of real datasets.
        """
        if variant not in VARIANTS:
            raise EvaluationError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if variant != "text_only" and not models.images.has_conditioner:
            raise EvaluationError(f"variant {variant!r} needs a trained conditioner (stage control)")
        if variant == "text_layout_image" and models.layout is None:
            raise EvaluationError("variant 'text_layout_image' needs the text -> layout model (stage layout)")
        spec, settings, segmenter = self.dataset.spec, self.settings, self.segmenter
        n = spec.num_classes
        batch_size = min(batch_size, num_examples)  # no padded examples generated for nothing
        conf_cond = np.zeros((n, n), np.int64)
        conf_gt = np.zeros((n, n), np.int64)
        fake_stats, fake_inception = fid_lib.FeatureStats(), fid_lib.FeatureStats()
        clip_results = []
        rows: List[dict] = []
        count = 0
        source = self.dataset.source(split)
        faith_images, faith_layouts = faithfulness.Scored(), faithfulness.Scored()
        for bi, batch in enumerate(self._batches(split, batch_size, num_examples)):
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), bi)
            keep, gt, tokens = batch["mask"], batch["label"], batch["tokens"]
            if variant == "text_only":
                cond = gt
                images = pipelines.text_to_image(models.images, tokens, rng, settings, size=gt.shape[1:3])
            elif variant == "control":
                cond = gt
                images = pipelines.layout_to_image(models.images, tokens, gt, rng, settings)
            else:
                cond = pipelines.text_to_layout(models.layout, tokens, jax.random.fold_in(rng, 7), settings)
                cond = stretch_labels(cond, gt.shape[1:3])
                images = pipelines.layout_to_image(models.images, tokens, cond, rng, settings)
            pred = segmenter.predict(images)
            conf_cond += segmentation.confusion_matrix(pred, cond, n, spec.ignore_id, mask=keep)
            conf_gt += segmentation.confusion_matrix(pred, gt, n, spec.ignore_id, mask=keep)
            fake_stats.add(segmenter.features(images)[keep])
            if inception is not None:
                fake_inception.add(inception(images[keep]))
            if clip_scorer is not None:
                clip_results.append(clip_scorer.score(images[keep], [c for c, k in zip(batch["caption"], keep) if k]))
            for j in np.nonzero(keep)[0]:
                facts = faithfulness.facts_of(spec, source[int(batch["index"][j])], batch["caption"][j])
                held = faith_images.add(self._reader(pred[j], images[j]), facts, spec.thing_classes)
                if variant == "text_layout_image":
                    faith_layouts.add(self._reader(cond[j]), facts, spec.thing_classes)
                if len(rows) < keep_rows:
                    rows.append({"caption": batch["caption"][j], "layout": np.asarray(cond[j]), "image": images[j],
                                 "real": batch["image"][j], "ground_truth": gt[j], "reading": pred[j],
                                 "facts": [(f.text, ok) for f, ok in zip(facts, held)]})
            count += int(keep.sum())
        miou, iou = segmentation.iou_from_confusion(conf_cond)
        real = self.real_feature_stats(split, num_examples, batch_size)
        result = {
            "image_miou": miou,
            "layout_miou": segmentation.iou_from_confusion(conf_gt)[0],
            "fid_segfeat": fid_lib.frechet_distance(*real.mu_sigma(), *fake_stats.mu_sigma()),
            "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(spec.class_names, iou)},
            "examples": count,
            "rows": rows,
            "faithfulness": faith_images,
        }
        result.update({f"faith/{k}": v for k, v in faith_images.summary().items()})
        if variant == "text_layout_image":
            result["layout_faithfulness"] = faith_layouts
        if inception is not None:
            real_i = self.real_inception_stats(inception, split, num_examples, batch_size)
            result["fid_inception"] = fid_lib.fid_from_stats(real_i, fake_inception)
        if clip_scorer is not None:
            result["clip_score"] = ClipScoreResult.concatenate(clip_results).score
        logging.info("evaluation %s on %s (%d examples): image mIoU %.3f, layout mIoU %.3f, FID(segfeat) %.2f",
                     variant, split, count, result["image_miou"], result["layout_miou"], result["fid_segfeat"])
        return result


def stretch_labels(ids: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour [B, h, w] -> [B, H, W] class ids (a square text -> layout map onto a whole frame)."""
    h, w = np.shape(ids)[1:3]
    if (h, w) == tuple(size):
        return ids
    ids = np.asarray(ids)
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return ids[:, rows][:, :, cols]


def flat_metrics(prefix: str, result: dict) -> Dict[str, float]:
    """{prefix/image_miou: ..., ...}: the scalar entries of `evaluate_variant`'s result."""
    return {f"{prefix}/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))}
