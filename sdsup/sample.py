r"""Generates images from a trained workdir.

  python -m sdsup.sample --workdir=DIR --prompt="sky over grass. a red house on the left." --out=OUT
  python -m sdsup.sample --workdir=DIR --prompt="..." --layout=map.png --out=OUT --num_samples=4 --seed=1

Writes OUT/image_*.png; with --layout also OUT/layout.npy (class ids) and
OUT/layout.png (colour-coded, with legend). Without --layout, when the
workdir's `layout` stage has finished, the text -> layout model draws one map
per sample first (OUT/layout_<i>.npy and .png) and each image is conditioned
on its map; --layout_only stops after the maps. The logic is in sdsup.inference.
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
_LAYOUT_ONLY = flags.DEFINE_bool("layout_only", False, "Only generate layouts from the prompt (no images).")
_LAYOUT_MODE = flags.DEFINE_enum("layout_mode", "sample", ["sample", "map"],
                                 "Generated layouts: sampled (diverse) or the most probable map.")
_LAYOUT_STEPS = flags.DEFINE_integer("layout_steps", None, "Unmasking passes (default: config layout.sampling).")
_LAYOUT_TEMPERATURE = flags.DEFINE_float("layout_temperature", None, "Draw temperature for sampled layouts.")
_LAYOUT_GUIDANCE = flags.DEFINE_float("layout_guidance", None, "Classifier-free guidance on the layout logits.")
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
        if _LAYOUT.value and _LAYOUT_ONLY.value:
            raise inference.InferenceError("--layout_only generates a layout; it cannot be combined with --layout")
        layout = inference.load_layout(_LAYOUT.value, gen.spec, gen.size) if _LAYOUT.value else None
        if layout is None and (_LAYOUT_ONLY.value or gen.has_layout_model):
            layouts = gen.layouts(prompt, _NUM.value, _SEED.value, _LAYOUT_MODE.value, _LAYOUT_STEPS.value,
                                  _LAYOUT_TEMPERATURE.value, _LAYOUT_GUIDANCE.value)
            for path in gen.save_layouts(_OUT.value, layouts, prompt):
                print(path)
            if _LAYOUT_ONLY.value:
                return
            images = gen.images(prompt, layouts if gen.has_conditioner else None, _NUM.value, _SEED.value,
                                _STEPS.value, _GUIDANCE.value)
            for path in gen.save(_OUT.value, images, None, prompt):
                print(path)
            return
        images = gen.images(prompt, layout, _NUM.value, _SEED.value, _STEPS.value, _GUIDANCE.value)
        for path in gen.save(_OUT.value, images, layout, prompt):
            print(path)
    except SdsupError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
