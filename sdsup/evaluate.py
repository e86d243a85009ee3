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
import types

from absl import flags

from sdsup import cli, inference
from sdsup.data.dataset import Dataset
from sdsup.evaluation import images, suite
from sdsup.models import io as model_io

def define_flags():
    f = types.SimpleNamespace()
    f.workdir = flags.DEFINE_string("workdir", None, "A training workdir (with config.json).")
    f.split = flags.DEFINE_enum("split", None, ["test", "validation"], "Split (default: config.evaluate.split).")
    f.examples = flags.DEFINE_integer("examples", None, "Examples per variant (default: config.evaluate.examples).")
    f.seed = flags.DEFINE_integer("seed", None, "Sampling seed (default: config.evaluate.seed).")
    f.clip = flags.DEFINE_string("clip_dir", None, "Local CLIP model directory (transformers layout) for CLIP score.")
    f.inception = flags.DEFINE_string("inception_dir", None, "sdsup Inception model dir (python -m "
                                      "sdsup.convert.inception) for the standard FID; without it only the "
                                      "segmenter-feature FID.")
    f.variants = flags.DEFINE_list("variants", None, "Variants to evaluate (default: all the workdir allows).")
    flags.mark_flags_as_required(["workdir"])
    return f


def check_flags(f) -> None:
    """Flag values that are wrong on their own, checked before any model or data is read."""
    if f.examples.value is not None and f.examples.value < 2:
        raise inference.InferenceError(f"--examples must be at least 2 (FID needs two), got {f.examples.value}")
    unknown = [v for v in f.variants.value or () if v not in images.VARIANTS]
    if unknown:
        raise inference.InferenceError(f"--variants: unknown variants {unknown}; known: {list(images.VARIANTS)}")
    if f.clip.value and not os.path.isdir(f.clip.value):
        raise inference.InferenceError(f"--clip_dir {f.clip.value} is not a directory (a local CLIP model, "
                                       "transformers layout)")
    if f.inception.value and not os.path.isfile(os.path.join(f.inception.value, model_io.CONFIG_FILE)):
        raise inference.InferenceError(f"--inception_dir {f.inception.value} holds no sdsup model (no "
                                       f"{model_io.CONFIG_FILE}); convert one with python -m sdsup.convert.inception")


def main(f):
    check_flags(f)
    session = inference.Session.from_workdir(f.workdir.value)
    session.workdir.require("evalseg")
    metrics = suite.evaluate_workdir(session.workdir, session.config, Dataset.open(session.config, session.tokenizer),
                                     session.settings, split=f.split.value, num_examples=f.examples.value,
                                     seed=f.seed.value, clip_dir=f.clip.value, variants=f.variants.value,
                                     inception_dir=f.inception.value)
    for key in sorted(metrics):
        if "/iou/" not in key:
            print(f"{key}: {metrics[key]:.4f}")
    print(session.workdir.file("report.md"))


if __name__ == "__main__":
    cli.run(main, define_flags)
