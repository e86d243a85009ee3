r"""Image sampler settings of text -> layout -> image, compared by faithfulness and FID:
`python -m sdsup.experiments.image_sampling`.

  python -m sdsup.experiments.image_sampling --workdir=workdirs/scenes --split=validation \
      --guidance=2,3,5 --conditioning_scale=1,1.5

For every combination, the workdir's text -> layout -> image pipeline (`text_layout_image`, or another
`--variant`) generates the split's first `--examples` captions with the same seed, and each setting is
scored as `sdsup.evaluate` scores it: the facts the images hold, segmenter-feature FID, image mIoU. The
table ranks settings by facts among those whose FID is no worse than the config's own setting's (choose on
validation, report on test). Writes OUT/image_sampling.json and OUT/image_sampling.md; metrics.json is not
touched.
"""

import dataclasses
import itertools
import json
import os
import types
from typing import List

from absl import flags

from sdsup import cli, inference
from sdsup.data.dataset import Dataset
from sdsup.evaluation import images, suite
from sdsup.experiments.layout_sampling import SweepError, parse_values

COLUMNS = ("facts", "object", "count", "position", "relation", "colour", "fid_segfeat", "image_miou")


def define_flags():
    f = types.SimpleNamespace()
    f.workdir = flags.DEFINE_string("workdir", None, "A training workdir whose control stage has finished.")
    f.out = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/image_sampling).")
    f.split = flags.DEFINE_enum("split", "validation", ["test", "validation"], "Split to score on.")
    f.examples = flags.DEFINE_integer("examples", 64, "Captions (the split's first).")
    f.seed = flags.DEFINE_integer("seed", 0, "Sampling seed, the same for every setting.")
    f.variant = flags.DEFINE_enum("variant", "text_layout_image", list(images.VARIANTS), "What generates.")
    f.guidance = flags.DEFINE_list("guidance", None, "Classifier-free guidance scales (default: the config's).")
    f.conditioning_scale = flags.DEFINE_list("conditioning_scale", None,
                                             "Conditioner residual scales (default: the config's).")
    flags.mark_flags_as_required(["workdir"])
    return f


def rank(entries: List[dict], baseline: dict) -> List[dict]:
    """Settings with FID no worse than `baseline`'s first, by facts; the rest after them, by facts."""
    ok = lambda e: e["fid_segfeat"] <= baseline["fid_segfeat"] + 1e-9
    return sorted(entries, key=lambda e: (not ok(e), -e["facts"]))


def main(f):
    if f.examples.value < 1:
        raise SweepError(f"--examples must be at least 1, got {f.examples.value}")
    session = inference.Session.from_workdir(f.workdir.value)
    models = suite.load_models(session.workdir)
    if f.variant.value not in models.available_variants():
        raise SweepError(f"{f.workdir.value} cannot generate {f.variant.value} (it has {models.available_variants()})")
    dataset = Dataset.open(session.config, session.tokenizer)
    segmenter = suite.load_segmenter(session.workdir, session.settings.compiler_options)
    base = session.settings
    grid = list(itertools.product(parse_values(f.guidance.value) or [base.guidance],
                                  parse_values(f.conditioning_scale.value) or [base.conditioning_scale]))
    if (base.guidance, base.conditioning_scale) not in grid:
        grid.insert(0, (base.guidance, base.conditioning_scale))
    entries = []
    for guidance, scale in grid:
        settings = dataclasses.replace(base, guidance=guidance, conditioning_scale=scale)
        result = images.Evaluator(dataset, segmenter, settings).evaluate_variant(
            f.variant.value, models, split=f.split.value, num_examples=f.examples.value, seed=f.seed.value)
        entry = {"guidance": guidance, "conditioning_scale": scale,
                 "config": (guidance, scale) == (base.guidance, base.conditioning_scale),
                 "fid_segfeat": result["fid_segfeat"], "image_miou": result["image_miou"]}
        entry.update({k: v for k, v in result["faithfulness"].summary().items() if k in COLUMNS})
        entries.append(entry)
    baseline = next(e for e in entries if e["config"])
    ranked = rank(entries, baseline)
    out = f.out.value or session.workdir.file("image_sampling")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "image_sampling.json"), "w") as fh:
        json.dump({"split": f.split.value, "examples": f.examples.value, "seed": f.seed.value,
                   "variant": f.variant.value, "entries": ranked}, fh, indent=1)
    lines = [f"# {f.variant.value} sampler settings on {f.split.value} ({f.examples.value} captions, seed "
             f"{f.seed.value}); first those with FID no worse than the config's (marked *)", "",
             "| guidance | conditioning scale | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for e in ranked:
        mark = " *" if e["config"] else ""
        lines.append(f"| {e['guidance']:g}{mark} | {e['conditioning_scale']:g} | "
                     + " | ".join("n/a" if e.get(c) is None else f"{e[c]:.3f}" for c in COLUMNS) + " |")
    with open(os.path.join(out, "image_sampling.md"), "w") as fh:
        fh.write("\n".join(lines + [""]))
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run(main, define_flags)
