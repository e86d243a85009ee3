r"""Generates images from a trained workdir.

  python -m sdsup.sample --workdir=DIR --prompt="sky over grass. a red house on the left." --out=OUT
  python -m sdsup.sample --workdir=DIR --prompt="..." --layout=map.png --out=OUT --num_samples=4 --seed=1

Writes OUT/image_*.png; with --layout also OUT/layout.npy (class ids) and
OUT/layout.png (colour-coded, with legend). Without --layout, when the
workdir's `layout` stage has finished, the text -> layout model draws one map
per sample first (OUT/layout_<i>.npy and .png) and each image is conditioned
on its map; --layout_only stops after the maps. The logic is in sdsup.inference.
"""

import types

from absl import flags

from sdsup import cli, inference

def define_flags():
    f = types.SimpleNamespace()
    f.workdir = flags.DEFINE_string("workdir", None, "A training workdir whose stages have finished.")
    f.prompt = flags.DEFINE_string("prompt", None, "What the image shows.")
    f.out = flags.DEFINE_string("out", None, "Output directory.")
    f.layout = flags.DEFINE_string("layout", None, "Label map: .npy class ids, or .png (ids or palette colours).")
    f.seed = flags.DEFINE_integer("seed", 0, "Random seed.")
    f.num = flags.DEFINE_integer("num_samples", 1, "Images to generate.")
    f.steps = flags.DEFINE_integer("steps", None, "DDIM steps (default: the config's sampling.steps).")
    f.guidance = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
    f.solver = flags.DEFINE_enum("solver", None, ["ddim", "dpm_solver_pp_2m"],
                                 "Image sampler (default: the config's sampling.solver).")
    f.layout_only = flags.DEFINE_bool("layout_only", False, "Only generate layouts from the prompt (no images).")
    f.layout_mode = flags.DEFINE_enum("layout_mode", "sample", ["sample", "map"],
                                      "Generated layouts: sampled (diverse) or the most probable map.")
    f.layout_steps = flags.DEFINE_integer("layout_steps", None, "Unmasking passes (default: config layout.sampling).")
    f.layout_temperature = flags.DEFINE_float("layout_temperature", None, "Draw temperature for sampled layouts.")
    f.layout_guidance = flags.DEFINE_float("layout_guidance", None, "Classifier-free guidance on the layout logits.")
    flags.mark_flags_as_required(["workdir", "prompt", "out"])
    return f


def check_flags(f) -> None:
    """Every flag value that can be wrong on its own, checked before the workdir's models are read."""
    if f.num.value < 1:
        raise inference.InferenceError(f"--num_samples must be at least 1, got {f.num.value}")
    for flag in (f.steps, f.layout_steps):
        if flag.value is not None and flag.value < 1:
            raise inference.InferenceError(f"--{flag.name} must be at least 1, got {flag.value}")
    for flag in (f.guidance, f.layout_guidance, f.layout_temperature):
        if flag.value is not None and not flag.value >= 0:  # also NaN
            raise inference.InferenceError(f"--{flag.name} must be >= 0, got {flag.value}")
    if f.layout.value and f.layout_only.value:
        raise inference.InferenceError("--layout_only generates a layout; it cannot be combined with --layout")
    inference.check_out_dir(f.out.value)


def main(f):
    check_flags(f)
    prompt = inference.check_prompt(f.prompt.value)
    session = inference.Session.from_workdir(f.workdir.value)
    layout = inference.load_layout(f.layout.value, session.spec, session.size) if f.layout.value else None
    if layout is None and (f.layout_only.value or session.has_layout_model):
        layouts = session.layouts(prompt, f.num.value, f.seed.value, f.layout_mode.value, f.layout_steps.value,
                                  f.layout_temperature.value, f.layout_guidance.value)
        for path in session.save_layouts(f.out.value, layouts, prompt):
            print(path)
        if f.layout_only.value:
            return
        images = session.images(prompt, layouts if session.has_conditioner else None, f.num.value, f.seed.value,
                                f.steps.value, f.guidance.value, f.solver.value)
        for path in session.save(f.out.value, images, None, prompt):
            print(path)
        return
    images = session.images(prompt, layout, f.num.value, f.seed.value, f.steps.value, f.guidance.value,
                            f.solver.value)
    for path in session.save(f.out.value, images, layout, prompt):
        print(path)


if __name__ == "__main__":
    cli.run(main, define_flags)
