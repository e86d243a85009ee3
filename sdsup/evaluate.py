r"""Evaluates a training workdir: `python -m sdsup.evaluate --workdir=DIR`.

  python -m sdsup.evaluate --workdir=workdirs/scenes --split=test --examples=256
  python -m sdsup.evaluate --workdir=DIR --clip_dir=/data/clip-vit-large-patch14   # adds CLIP score

Image mIoU by the evaluation segmenter, segmenter-feature FID and (with a
local CLIP model) CLIP score for every variant the workdir's finished stages
allow (text_only, control, text_layout_image); merges them into
DIR/metrics.json and rebuilds DIR/report.md with sample grids and per-class
IoU bars. Defaults come from the run's `config.evaluate`. The logic is in
`sdsup.evaluation`.
"""

import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (with config.json).")
_SPLIT = flags.DEFINE_enum("split", None, ["test", "validation"], "Split (default: config.evaluate.split).")
_EXAMPLES = flags.DEFINE_integer("examples", None, "Examples per variant (default: config.evaluate.examples).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: config.evaluate.seed).")
_CLIP = flags.DEFINE_string("clip_dir", None, "Local CLIP model directory (transformers layout) for CLIP score.")
_INCEPTION = flags.DEFINE_string("inception_dir", None, "sdsup Inception model dir (python -m sdsup.convert.inception) "
                                  "for the standard FID; without it only the segmenter-feature FID.")
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to evaluate (default: all the workdir allows).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from sdsup import inference
    from sdsup.errors import SdsupError
    from sdsup.evaluation import suite

    try:
        if _EXAMPLES.value is not None and _EXAMPLES.value < 2:
            raise inference.InferenceError(f"--examples must be at least 2 (FID needs two), got {_EXAMPLES.value}")
        gen = inference.Generator.from_workdir(_WORKDIR.value)
        if not os.path.exists(os.path.join(_WORKDIR.value, "evalseg", "DONE.json")):
            raise inference.InferenceError(f"{_WORKDIR.value}: stage evalseg (the evaluation segmenter) has not "
                                           "finished; train it first")
        metrics = suite.evaluate_workdir(gen.ctx, split=_SPLIT.value, num_examples=_EXAMPLES.value,
                                         seed=_SEED.value, clip_dir=_CLIP.value, variants=_VARIANTS.value,
                                         inception_dir=_INCEPTION.value)
    except SdsupError as e:
        sys.exit(f"error: {e}")
    for key in sorted(metrics):
        if "/iou/" not in key:
            print(f"{key}: {metrics[key]:.4f}")
    print(os.path.join(_WORKDIR.value, "report.md"))


if __name__ == "__main__":
    app.run(main)
