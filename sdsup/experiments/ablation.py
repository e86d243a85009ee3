r"""The ablation behind ALDM's claim, on one config: does adversarial supervision make images follow layouts?

  python -m sdsup.experiments.ablation --workdir=DIR [--config=configs/scenes.py[:smoke]] [--seeds=3]
  python -m sdsup.experiments.ablation --workdir=DIR --from_workdir=RUN   # reuse a finished sdsup.train run

Variants, with the same budget (the config's control stage) and seeds:
  text_only          the text-conditional LDM, no layout;
  control            + the segmentation conditioner on ground-truth layouts, lambda_adv = 0;
  aldm               + adversarial supervision (the config's lambda_adv);
  text_layout_image  the full pipeline: layouts generated from the caption, into the aldm conditioner.

Shared stages (data, vae, ldm, layout, discriminator, evalseg) train once, in DIR/shared
(or are taken from --from_workdir when its config agrees); each (variant,
seed) conditioner trains in DIR/runs/<variant>_s<seed>/, whose other stages
link to the shared ones. Seed s sets `config.seed + s` (the conditioner's
initialisation, data order and step noise) and the sampling seed of the
evaluation. Both conditioners run the same compiled step: lambda_adv = 0
still computes the adversarial branch (and updates the segmenter, which then
only monitors), so the budget is equal in wall time too.

Writes DIR/ablation.json
  {"variants": {name: {"fid": {"mean", "std", "values"}, "image_miou": ..., "layout_miou": ...}}, ...}
and DIR/report.md (table, target, sample grids of the same prompts across
variants, discussion). Metrics are those of `sdsup.evaluation.images`;
"fid" is the segmenter-feature FID.
"""

from __future__ import annotations

import json
import os
import types
from typing import Dict, List, Optional

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from sdsup import cli, config_lib, parallel, stages, viz
from sdsup.errors import SdsupError
from sdsup.evaluation import faithfulness, images, report, suite
from sdsup.workdir import Workdir, config_differences

def define_flags():
    f = types.SimpleNamespace()
    f.config = config_flags.DEFINE_config_file("config", "configs/scenes.py", "Config file (configs/*.py[:arg]).",
                                               lock_config=True)
    f.workdir = flags.DEFINE_string("workdir", None, "Output directory of the ablation.")
    f.seeds = flags.DEFINE_integer("seeds", 3, "Training and sampling seeds per variant.")
    f.from_workdir = flags.DEFINE_string("from_workdir", None,
                                         "A finished `sdsup.train` workdir of the same config whose stages to reuse.")
    f.split = flags.DEFINE_enum("split", None, ["test", "validation"], "Split (default: config.evaluate.split).")
    f.examples = flags.DEFINE_integer("examples", None, "Examples per variant (default: config.evaluate.examples).")
    flags.mark_flags_as_required(["workdir"])
    return f


VARIANTS = ("text_only", "control", "aldm", "text_layout_image")
SHARED_STAGES = ("data", "vae", "ldm", "layout", "planner", "discriminator", "evalseg")
# Config sections that decide the shared stages: a reused workdir must agree on all of them.
SHARED_SECTIONS = ("data", "text", "vae", "diffusion", "ldm", "layout", "planner", "discriminator", "evalseg",
                   "input")
METRICS = ("fid", "image_miou", "layout_miou")
FAITH_METRICS = ("facts", "captions_all_right", "object", "count", "position", "relation", "colour")
TARGET_MIOU_GAIN, TARGET_FID_RATIO = 0.05, 1.1


class AblationError(SdsupError):
    pass


def _plain(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


def check_reusable(config, workdir: str, stage_names) -> None:
    """Raises AblationError unless `workdir`'s config agrees with `config` on the shared sections."""
    wd = Workdir(workdir)
    if not wd.has_config():
        raise AblationError(f"--from_workdir={workdir} is not a training workdir (no config.json)")
    theirs = _plain(wd.config())
    ours = _plain(config)
    for section in SHARED_SECTIONS:
        if section in ours and theirs.get(section) != ours[section]:
            named = next(config_differences(theirs.get(section), ours[section], section), None)
            what = f" (config.{named[0]} is {named[2]!r} here, {named[1]!r} there)" if named else ""
            raise AblationError(f"--from_workdir={workdir} was trained with another config.{section}{what}; "
                                f"the ablation needs the shared stages of this config")
    for name in stage_names:
        if not wd.is_done(name):
            raise AblationError(f"--from_workdir={workdir}: stage {name} has not finished")


def variant_config(config, seed: int, lambda_adv: float):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.seed = int(config.seed) + seed
        c.control.lambda_adv = float(lambda_adv)
    return c


def link_shared(shared: str, run_dir: str, stage_names) -> None:
    """run_dir/<stage> -> shared/<stage> for the shared stages (relative links: the tree can move)."""
    os.makedirs(run_dir, exist_ok=True)
    for name in stage_names:
        link = os.path.join(run_dir, name)
        target = os.path.relpath(os.path.join(shared, name), run_dir)
        if os.path.islink(link):
            if os.readlink(link) == target:
                continue
            os.remove(link)
        elif os.path.exists(link):
            raise AblationError(f"{link} exists and is not a link to the shared stage")
        os.symlink(target, link)


def summarize(values: Dict[str, List[dict]]) -> dict:
    """{variant: [per-seed result]} -> {variant: {metric: {mean, std, values}}}."""
    out = {}
    for variant, results in values.items():
        out[variant] = {}
        pairs = [("fid", "fid_segfeat"), ("image_miou", "image_miou"), ("layout_miou", "layout_miou")]
        pairs += [(f"faith_{m}", f"faith/{m}") for m in FAITH_METRICS]
        for m, key in pairs:
            if not all(key in r for r in results):
                continue  # e.g. a kind of fact no caption states
            xs = [float(r[key]) for r in results]
            out[variant][m] = {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "values": xs}
    return out


def target_check(summary: dict) -> dict:
    a, c = summary.get("aldm"), summary.get("control")
    if not a or not c:
        return {}
    gain = a["image_miou"]["mean"] - c["image_miou"]["mean"]
    ratio = a["fid"]["mean"] / max(c["fid"]["mean"], 1e-12)
    return {"image_miou_gain": gain, "fid_ratio": ratio, "goal_image_miou_gain": TARGET_MIOU_GAIN,
            "goal_fid_ratio": TARGET_FID_RATIO, "met": bool(gain >= TARGET_MIOU_GAIN and ratio <= TARGET_FID_RATIO)}


def run(config, workdir: str, seeds: int, from_workdir: Optional[str] = None, split: Optional[str] = None,
        examples: Optional[int] = None) -> dict:
    if seeds < 1:
        raise AblationError(f"--seeds must be at least 1, got {seeds}")
    config_lib.validate(config)
    shared_names = [s for s in config.stages if s in SHARED_STAGES]
    for needed in ("vae", "ldm", "evalseg", "layout"):
        if needed not in shared_names:
            raise AblationError(f"the ablation needs stage {needed!r} in config.stages")
    if examples is not None and examples < 2:
        raise AblationError(f"--examples must be at least 2 (FID needs two), got {examples}")
    if from_workdir:  # checked before anything is written
        check_reusable(config, Workdir(from_workdir).path, shared_names)
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise AblationError(f"--workdir {workdir} exists and is not a directory")
    mesh = parallel.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)
    if from_workdir:
        shared = Workdir(from_workdir)
    else:
        shared = Workdir(os.path.join(workdir, "shared"))
        shared.write_config(config_lib.to_json(config))
        stages.run_all(stages.Context(config=config, workdir=shared, mesh=mesh), only=shared_names)

    cfg_eval = config.evaluate
    split = split or cfg_eval.split
    examples = int(examples or cfg_eval.examples)
    shared_ctx = stages.Context(config=config, workdir=shared, mesh=mesh)
    spec = shared_ctx.dataset.spec
    settings = shared_ctx.sampling()
    evaluator = images.Evaluator(shared_ctx.dataset, suite.load_segmenter(shared, settings.compiler_options),
                                 settings, full_frame=bool(cfg_eval.get("full_frame", False)))
    results: Dict[str, List[dict]] = {v: [] for v in VARIANTS}
    faith: Dict[str, List[faithfulness.Scored]] = {v: [] for v in VARIANTS + ("sampled_layouts",)}
    first_rows: Dict[str, list] = {}
    for s in range(seeds):
        conditioners = {}
        for name, lam in (("control", 0.0), ("aldm", float(config.control.lambda_adv))):
            vconfig = variant_config(config, s, lam)
            run_dir = Workdir(os.path.join(workdir, "runs", f"{name}_s{s}"))
            reuse = (from_workdir and s == 0 and lam > 0 and _same_control(shared, vconfig))
            if reuse:
                run_dir = shared
            else:
                link_shared(shared.path, run_dir.path, shared_names)
                run_dir.write_config(config_lib.to_json(vconfig))
                stages.run_all(shared_ctx.derived(vconfig, run_dir), only=["control"])
            conditioners[name] = run_dir.stage_dir("control")
        for name in VARIANTS:
            kind = {"aldm": "control"}.get(name, name)
            models = suite.load_models(shared, conditioners["aldm" if name in ("aldm", "text_layout_image")
                                                            else "control"])
            if name == "text_only":
                models = images.Models(models.images.without_conditioner(), models.layout)
            r = evaluator.evaluate_variant(kind, models, split=split, num_examples=examples, seed=s)
            first_rows.setdefault(name, r.pop("rows"))
            r.pop("rows", None)
            faith[name].append(r.pop("faithfulness"))
            if "layout_faithfulness" in r:
                faith["sampled_layouts"].append(r.pop("layout_faithfulness"))
            results[name].append(r)
    summary = summarize(results)
    out = {"variants": summary, "target": target_check(summary), "faithfulness": faithfulness_summary(faith),
           "seeds": seeds, "split": split,
           "examples": examples, "config": _plain(config), "shared": shared.path,
           "per_seed": {v: [{k: x for k, x in r.items() if k != "per_class_iou"} for r in rs]
                        for v, rs in results.items()}}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "ablation.json"), "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        pictures = os.path.join(workdir, "pictures")
        viz.save_png(comparison_grid(first_rows, spec), os.path.join(pictures, "samples.png"))
        series = {v: [float(np.mean([r["per_class_iou"][c] if r["per_class_iou"][c] is not None else np.nan
                                     for r in results[v]])) for c in spec.class_names] for v in VARIANTS}
        viz.save_png(viz.bar_chart(list(spec.class_names), series, title="Per-class image IoU (mean over seeds)"),
                     os.path.join(pictures, "per_class_iou.png"))
        report.record_command(workdir, config, split=split, examples=examples, seeds=seeds)
        write_report(workdir, out)
    logging.info("ablation: %s", json.dumps(out["target"]))
    return out


def faithfulness_summary(faith: Dict[str, List[faithfulness.Scored]]) -> dict:
    """Captions of every seed pooled: the sampled layouts' own faithfulness, and each variant's pooled fact
    accuracy minus text_only's on the same captions and noise, with a 95% bootstrap interval."""
    pooled = {v: faithfulness.Scored(held=[h for s in scored for h in s.held],
                                     coherence=[c for s in scored for c in s.coherence])
              for v, scored in faith.items() if scored}
    out = {"vs_text_only": {v: faithfulness.paired_difference(pooled[v], pooled["text_only"])
                            for v in VARIANTS if v != "text_only" and v in pooled}}
    if "sampled_layouts" in pooled:
        out["sampled_layouts"] = pooled["sampled_layouts"].summary()
    return out


def _same_control(workdir: Workdir, vconfig) -> bool:
    """Whether `workdir`'s finished control stage is this variant's (same control config and seed)."""
    if not workdir.is_done("control") or not workdir.has_config():
        return False
    theirs = _plain(workdir.config())
    ours = _plain(vconfig)
    return theirs.get("control") == ours["control"] and theirs.get("seed") == ours["seed"]


def comparison_grid(rows: Dict[str, list], spec) -> np.ndarray:
    """The same prompts across variants: caption | ground truth | text_only | control | aldm | generated layout | tli."""
    n = min(len(r) for r in rows.values())
    grid = []
    for i in range(n):
        gt = rows["control"][i]
        grid.append({"caption": gt["caption"],
                     "panels": [gt["ground_truth"], rows["text_only"][i]["image"], rows["control"][i]["image"],
                                rows["aldm"][i]["image"], rows["text_layout_image"][i]["layout"],
                                rows["text_layout_image"][i]["image"]]})
    return viz.captioned_grid(grid, spec.class_names, spec.palette, spec.ignore_id)


def _pm(m: dict, digits: int = 3) -> str:
    return f"{m['mean']:.{digits}f} +- {m['std']:.{digits}f}"


def discussion(out: dict) -> List[str]:
    """A short reading of the numbers; it states what the numbers say, nothing they do not."""
    v, t = out["variants"], out["target"]
    lines = []
    if t:
        lines.append(f"Adversarial supervision changes image mIoU by {100 * t['image_miou_gain']:+.1f} points "
                     f"(aldm {_pm(v['aldm']['image_miou'])} vs control {_pm(v['control']['image_miou'])}) at "
                     f"{t['fid_ratio']:.2f}x the control variant's FID; the target (+{100 * TARGET_MIOU_GAIN:.0f} "
                     f"points at <= {TARGET_FID_RATIO}x FID) is {'met' if t['met'] else 'NOT met'}.")
        spread = max(v["aldm"]["image_miou"]["std"], v["control"]["image_miou"]["std"])
        if out["seeds"] > 1 and abs(t["image_miou_gain"]) < 2 * spread:
            lines.append(f"The difference is within twice the seed-to-seed spread ({100 * spread:.1f} points): "
                         "not a reliable effect at this budget.")
        if out["seeds"] == 1:
            lines.append("One seed only: no spread is known, so no difference here is reliable.")
    lines.append(f"Layouts help at all: control's image mIoU is {_pm(v['control']['image_miou'])} against "
                 f"{_pm(v['text_only']['image_miou'])} for text alone, whose images are scored against the layout "
                 "of the scene their caption came from.")
    lines.append(f"End to end (text -> generated layout -> image), the image matches the real scene's layout with "
                 f"mIoU {_pm(v['text_layout_image']['layout_miou'])}, against "
                 f"{_pm(v['aldm']['layout_miou'])} when the true layout is given.")
    return lines


def faithfulness_lines(out: dict) -> List[str]:
    """The faithfulness table (mean +- std over seeds) and the paired differences against text_only."""
    v, f = out["variants"], out.get("faithfulness", {})
    if "faith_facts" not in v.get("text_only", {}):
        return []
    columns = [m for m in FAITH_METRICS if all(f"faith_{m}" in v[name] for name in VARIANTS)]
    lines = ["", "## Faithfulness", "",
             "The share of what each caption states that holds in the evaluation segmenter's reading of the image "
             "(objects, \"two\" as two, positions, relations, colours; `sdsup.evaluation.faithfulness`).", "",
             "| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in VARIANTS:
        lines.append(f"| {name} | " + " | ".join(_pm(v[name][f"faith_{m}"]) for m in columns) + " |")
    layouts = f.get("sampled_layouts")
    if layouts:
        lines.append("| (text_layout_image's sampled layouts) | " + " | ".join(
            f"{layouts[m]:.3f}" if m in layouts else "n/a" for m in columns) + " |")
    if f.get("vs_text_only"):
        lines += ["", "Pooled fact accuracy minus text_only's, every seed's captions pooled (same captions and noise; "
                  "95% bootstrap interval):", "", "| variant | difference | 95% interval |", "|---|---|---|"]
        for name, d in f["vs_text_only"].items():
            lines.append(f"| {name} | {d['difference']:+.3f} | {d['ci_low']:+.3f} .. {d['ci_high']:+.3f} |")
    return lines


def write_report(workdir: str, out: dict) -> None:
    v = out["variants"]
    lines = ["# Ablation: adversarial supervision (ALDM) on the segmentation conditioner", "",
             f"Split: {out['split']}, {out['examples']} examples per variant and seed, {out['seeds']} seed(s); "
             "mean +- std over seeds. FID is the segmenter-feature FID (not comparable with published FID).", "",
             "| variant | image mIoU | mIoU vs ground truth | FID (segmenter features) |", "|---|---|---|---|"]
    for name in VARIANTS:
        lines.append(f"| {name} | {_pm(v[name]['image_miou'])} | {_pm(v[name]['layout_miou'])} | "
                     f"{_pm(v[name]['fid'], 2)} |")
    lines += faithfulness_lines(out)
    lines += ["", "## Discussion", ""] + [f"- {x}" for x in discussion(out)] + [""]
    lines += ["## Samples (seed 0)", "",
              "caption | ground-truth layout | text_only | control | aldm | generated layout | text_layout_image", "",
              "![samples](pictures/samples.png)", "", "![per-class IoU](pictures/per_class_iou.png)", ""]
    prov = report.read_provenance(workdir)
    if prov:
        lines += ["## Command", "", "```", prov.get("command", ""), "```", ""]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines))


def main(f):
    config = cli.loaded_config(f.config)
    cli.use_compilation_cache(config)
    out = run(config, f.workdir.value, f.seeds.value, f.from_workdir.value, f.split.value, f.examples.value)
    print(json.dumps({k: {m: round(x["mean"], 4) for m, x in d.items()} for k, d in out["variants"].items()}))
    print(os.path.join(f.workdir.value, "report.md"))


if __name__ == "__main__":
    cli.run(main, define_flags)
