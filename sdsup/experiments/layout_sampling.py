r"""Text -> layout sampler settings, compared by faithfulness and coherence: `python -m sdsup.experiments.layout_sampling`.

  python -m sdsup.experiments.layout_sampling --workdir=workdirs/scenes --split=validation \
      --steps=8,16 --temperature=1,0.5 --choice_temperature=4.5,1,0 --guidance=2,4

For every combination of the listed settings (and the most probable map) the workdir's layout model draws
one map per caption -- with the object planner (`--plan_temperature`, `--plan_guidance`) and without it,
when the workdir has one (`--planner`) -- of the split's first `--examples` examples (same seed for every setting), and each
map is scored against what its caption states (`sdsup.evaluation.faithfulness`: facts per kind, captions
with every fact right, stray thing pixels, components per named thing, maps holding unnamed things) and
against the example's ground truth (mIoU). Choose on validation, report on test. Writes
OUT/layout_sampling.json (one entry per setting) and OUT/layout_sampling.md (a table, best first).
"""

import dataclasses
import itertools
import json
import os
import types
from typing import List, Sequence

import jax
import numpy as np
from absl import flags

from sdsup import cli, inference, pipelines, segmentation
from sdsup.data.dataset import Dataset
from sdsup.evaluation import faithfulness

COLUMNS = ("facts", "captions_all_right", "object", "count", "position", "relation", "stray_share",
           "components_per_thing", "unnamed_things", "miou")


class SweepError(inference.InferenceError):
    """A sweep the workdir or the flags cannot support."""


def define_flags():
    f = types.SimpleNamespace()
    f.workdir = flags.DEFINE_string("workdir", None, "A training workdir with a finished layout stage.")
    f.out = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/layout_sampling).")
    f.split = flags.DEFINE_enum("split", "validation", ["test", "validation"], "Split to score on.")
    f.examples = flags.DEFINE_integer("examples", 128, "Captions (the split's first).")
    f.seed = flags.DEFINE_integer("seed", 0, "Sampling seed, the same for every setting.")
    f.steps = flags.DEFINE_list("steps", None, "Unmasking passes to try (default: the config's).")
    f.temperature = flags.DEFINE_list("temperature", None, "Draw temperatures to try (default: the config's).")
    f.choice_temperature = flags.DEFINE_list("choice_temperature", None,
                                             "Gumbel noise on the keep-confidences (default: the config's).")
    f.guidance = flags.DEFINE_list("guidance", None, "Classifier-free guidance scales (default: the config's).")
    f.planner = flags.DEFINE_enum("planner", "both", ["both", "with", "without"],
                                  "With a finished planner stage: score planned layouts, the layout model's alone, "
                                  "or both.")
    f.plan_temperature = flags.DEFINE_list("plan_temperature", None,
                                           "Planner draw temperatures to try (default: the config's).")
    f.plan_guidance = flags.DEFINE_list("plan_guidance", None, "Planner guidance scales (default: the config's).")
    flags.mark_flags_as_required(["workdir"])
    return f


def settings_grid(base: pipelines.LayoutSampling, **choices: Sequence[float]) -> List[pipelines.LayoutSampling]:
    """The most probable map, then every combination of the given values (fields not given keep `base`'s)."""
    names = [k for k, v in choices.items() if v]
    grid = [dataclasses.replace(base, mode="map")]
    for values in itertools.product(*(choices[k] for k in names)):
        grid.append(dataclasses.replace(base, mode="sample", **dict(zip(names, values))))
    return grid


def label(sampling: pipelines.LayoutSampling, planned: bool = False) -> str:
    plan = (f"planned (temperature {sampling.plan_temperature:g}, guidance {sampling.plan_guidance:g}), "
            if planned else "")
    if sampling.mode == "map":
        return plan + "most probable map"
    return (plan + f"steps {sampling.steps}, temperature {sampling.temperature:g}, "
            f"choice {sampling.choice_temperature:g}, guidance {sampling.guidance:g}")


def score_settings(dataset: Dataset, models: dict, settings: pipelines.Settings,
                   grid: Sequence[pipelines.LayoutSampling], split: str, examples: int, seed: int,
                   calibration: faithfulness.Calibration, batch_size: int = 32) -> List[dict]:
    """One entry per setting: {"setting", "label", "planned", faithfulness summary..., "miou"}; planned when
    `models` holds a planner."""
    spec = dataset.spec
    n = spec.num_classes
    source = dataset.source(split)
    scored = [faithfulness.Scored() for _ in grid]
    confusion = [np.zeros((n, n), np.int64) for _ in grid]
    for bi, batch in enumerate(dataset.eval_batches(split, min(batch_size, examples), limit=examples)):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), bi)
        keep = np.nonzero(batch["mask"])[0]
        stated = {j: faithfulness.facts_of(spec, source[int(batch["index"][j])], batch["caption"][j]) for j in keep}
        for i, sampling in enumerate(grid):
            maps = pipelines.text_to_layout(models, batch["tokens"], rng, settings, sampling)
            confusion[i] += segmentation.confusion_matrix(maps, batch["label"], n, spec.ignore_id, mask=batch["mask"])
            for j in keep:
                scored[i].add(faithfulness.MapReader(maps[j], calibration, spec.class_names), stated[j],
                              spec.thing_classes)
    out = []
    for sampling, s, conf in zip(grid, scored, confusion):
        planned = "planner" in models
        entry = {"setting": dataclasses.asdict(sampling), "label": label(sampling, planned), "planned": planned,
                 **s.summary()}
        entry["miou"] = segmentation.iou_from_confusion(conf)[0]
        out.append(entry)
    return out


def table(entries: List[dict]) -> List[str]:
    ranked = sorted(entries, key=lambda e: (-e["facts"], e.get("stray_share", 0.0)))
    lines = ["| setting | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for e in ranked:
        lines.append(f"| {e['label']} | " + " | ".join("n/a" if e.get(c) is None else f"{e[c]:.3f}" for c in COLUMNS)
                     + " |")
    return lines


def parse_values(values, cast=float) -> List:
    """A sweep flag's list of values as numbers; a SweepError naming them when they are not."""
    try:
        return [cast(v) for v in values] if values else []
    except ValueError as e:
        raise SweepError(f"cannot read the sweep values {values}: {e}") from None


def main(f):
    if f.examples.value < 1:
        raise SweepError(f"--examples must be at least 1, got {f.examples.value}")
    session = inference.Session.from_workdir(f.workdir.value)
    session.workdir.require("layout")
    dataset = Dataset.open(session.config, session.tokenizer)
    models = session.workdir.layout_models()
    base = session.settings.layout
    grid = settings_grid(base, steps=parse_values(f.steps.value, int), temperature=parse_values(f.temperature.value),
                         choice_temperature=parse_values(f.choice_temperature.value), guidance=parse_values(f.guidance.value))
    if len(grid) == 1:
        grid.append(dataclasses.replace(base, mode="sample"))
    calibration = faithfulness.calibrate(dataset)
    plain = {k: v for k, v in models.items() if not k.startswith("planner")}
    entries = []
    if "planner" not in models or f.planner.value in ("both", "without"):
        entries += score_settings(dataset, plain, session.settings, grid, f.split.value, f.examples.value,
                                  f.seed.value, calibration)
    if "planner" in models and f.planner.value in ("both", "with"):
        planned_grid = [dataclasses.replace(g, plan_temperature=t, plan_guidance=w) for g in grid
                        for t in (parse_values(f.plan_temperature.value) or [base.plan_temperature])
                        for w in (parse_values(f.plan_guidance.value) or [base.plan_guidance])]
        entries += score_settings(dataset, models, session.settings, planned_grid, f.split.value, f.examples.value,
                                  f.seed.value, calibration)
    out = f.out.value or session.workdir.file("layout_sampling")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "layout_sampling.json"), "w") as fh:
        json.dump({"split": f.split.value, "examples": f.examples.value, "seed": f.seed.value,
                   "entries": entries}, fh, indent=1)
    lines = [f"# Layout sampler settings on {f.split.value} ({f.examples.value} captions, seed {f.seed.value})", "",
             *table(entries), ""]
    with open(os.path.join(out, "layout_sampling.md"), "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run(main, define_flags)
