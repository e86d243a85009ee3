r"""Generates images from a trained workdir.

  python -m sdsup.sample --workdir=DIR --prompt="sky over grass. a red house on the left." --out=OUT
  python -m sdsup.sample --workdir=DIR --prompt="..." --layout=map.png --out=OUT --num_samples=4 --seed=1

Writes OUT/image_*.png; with --layout also OUT/layout.npy (class ids) and
OUT/layout.png (colour-coded, with legend). The logic is in sdsup.inference.
"""

import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir whose stages have finished.")
_PROMPT = flags.DEFINE_string("prompt", None, "What the image shows.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_LAYOUT = flags.DEFINE_string("layout", None, "Label map: .npy class ids, or .png (ids or palette colours).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Images to generate.")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps (default: the config's sampling.steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
flags.mark_flags_as_required(["workdir", "prompt", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from sdsup import inference
    from sdsup.errors import SdsupError

    try:
        if _NUM.value < 1:
            raise inference.InferenceError(f"--num_samples must be at least 1, got {_NUM.value}")
        if _STEPS.value is not None and _STEPS.value < 1:
            raise inference.InferenceError(f"--steps must be at least 1, got {_STEPS.value}")
        prompt = inference.check_prompt(_PROMPT.value)
        gen = inference.Generator.from_workdir(_WORKDIR.value)
        layout = inference.load_layout(_LAYOUT.value, gen.spec, gen.size) if _LAYOUT.value else None
        images = gen.images(prompt, layout, _NUM.value, _SEED.value, _STEPS.value, _GUIDANCE.value)
        for path in gen.save(_OUT.value, images, layout, prompt):
            print(path)
    except SdsupError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
