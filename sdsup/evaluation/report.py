"""WORKDIR/metrics.json (flat name -> number) and WORKDIR/report.md, built from it.

Every evaluation (the layout stage's, `sdsup.evaluate`'s) merges its numbers
into metrics.json and calls `write_report`, which rebuilds report.md from
metrics.json alone plus the pictures that exist, so the report never
disagrees with the numbers and any evaluation can run again on its own.

Key scheme:
  layout/<metric>[/val]               text -> layout (sdsup.evaluation.layout)
  layout/iou_map/<class>              per-class IoU of the most probable map (test split)
  layout/faith_<method>/<metric>      the facts the layouts hold (map, sample, retrieval; test split)
  planner/...                         the same for the planner stage's planned layouts
  images/<variant>/<metric>           image_miou, layout_miou, fid_segfeat, clip_score, examples
  images/<variant>/iou/<class>        per-class image IoU
  images/real/miou                    the evaluation segmenter on real images (the ceiling)
  images/<row>/faith/<metric>         faithfulness (sdsup.evaluation.faithfulness): facts, captions_all_right,
                                      one share per fact kind, coherence; rows are the variants, `real` (the
                                      segmenter on real images) and `ground_truth` (the check's own ceiling)
  images/<variant>/layout_faith/<m>   the same for the sampled layouts themselves (text_layout_image)
  images/<variant>/faith_vs_text_only/{difference,ci_low,ci_high}
                                      pooled fact accuracy minus text_only's, same captions and noise, 95% CI
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from typing import Dict, Iterable, List, Optional

from sdsup import viz

METRICS_FILE, REPORT_FILE, PROVENANCE_FILE = "metrics.json", "report.md", "evaluation/provenance.json"
IMAGE_METRICS = (("image_miou", "image mIoU (vs conditioning layout)"), ("layout_miou", "mIoU vs ground truth"),
                 ("fid_segfeat", "FID (segmenter features)"), ("fid_inception", "FID (Inception)"),
                 ("clip_score", "CLIP score"))
# Rows of images/<row>/... that are references, not generators.
REFERENCE_ROWS = ("real", "ground_truth")
FAITH_COLUMNS = (("facts", "facts"), ("captions_all_right", "captions all right"), ("object", "objects"),
                 ("count", "counts"), ("position", "positions"), ("relation", "relations"), ("colour", "colours"),
                 ("stray_share", "stray thing pixels"), ("components_per_thing", "components per thing"),
                 ("unnamed_things", "maps with unnamed things"))
FAITH_KINDS = ("facts", "object", "count", "position", "relation", "colour")
LAYOUT_ROWS = ("miou_map", "miou_sample_mean", "miou_sample_std", "miou_retrieval", "miou_majority", "miou_oracle",
               "relation_accuracy", "relation_accuracy_sample_mean", "relation_accuracy_retrieval",
               "relation_accuracy_oracle")


def read_metrics(workdir: str) -> Dict[str, float]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def merge_metrics(workdir: str, metrics: Dict[str, float]) -> Dict[str, float]:
    """Adds `metrics` to WORKDIR/metrics.json (atomically) and returns the whole file's content."""
    merged = read_metrics(workdir)
    merged.update({k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
                   for k, v in metrics.items()})
    _write_json(os.path.join(workdir, METRICS_FILE), merged)
    return merged


def read_provenance(workdir: str) -> dict:
    path = os.path.join(workdir, PROVENANCE_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record_command(workdir: str, config=None, **facts) -> None:
    """Keeps the command line, config and `facts` (e.g. split=...) of this evaluation for the report."""
    prov = dict(read_provenance(workdir), **facts)
    prov["command"] = " ".join(shlex.quote(a) for a in ["python", "-m"] + _argv())
    if config is not None:
        prov["config"] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    _write_json(os.path.join(workdir, PROVENANCE_FILE), prov)


def _argv() -> List[str]:
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):  # python -m sdsup.evaluate gives .../sdsup/evaluate.py
        parts = os.path.normpath(argv[0])[:-3].split(os.sep)
        if "sdsup" in parts:
            argv[0] = ".".join(parts[parts.index("sdsup"):])
    return argv


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _variants(metrics: Dict[str, float]) -> List[str]:
    seen = []
    for key in metrics:
        parts = key.split("/")
        if parts[0] == "images" and len(parts) >= 3 and parts[1] not in REFERENCE_ROWS and parts[1] not in seen:
            seen.append(parts[1])
    order = ("text_only", "control", "aldm", "text_layout_image")
    return sorted(seen, key=lambda v: (order.index(v) if v in order else len(order), v))


def _picture(workdir: str, rel: str, alt: str) -> List[str]:
    return [f"![{alt}]({rel})", ""] if os.path.exists(os.path.join(workdir, rel)) else []


def image_section(workdir: str, metrics: Dict[str, float], class_names: Optional[Iterable[str]] = None) -> List[str]:
    variants = _variants(metrics)
    if not variants:
        return []
    split = read_provenance(workdir).get("split", "test")
    lines = ["## Images", "",
             f"Split: {split}{' (held-out compositions)' if split == 'test' else ''}; "
             f"{int(metrics.get(f'images/{variants[0]}/examples', 0))} examples per variant, one image each.", "",
             "| variant | " + " | ".join(label for _, label in IMAGE_METRICS) + " |",
             "|---|" + "---|" * len(IMAGE_METRICS)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(_fmt(metrics.get(f"images/{v}/{m}"), 2 if m.startswith("fid") else 3)
                                              for m, _ in IMAGE_METRICS) + " |")
    if "images/real/miou" in metrics:
        lines.append(f"| real images (ceiling) | {_fmt(metrics['images/real/miou'])} | "
                     f"{_fmt(metrics['images/real/miou'])} | 0 | 0 | n/a |")
    lines += ["", "image mIoU: the evaluation segmenter (trained on real images only, never the discriminator) "
              "segments each generated image; the confusion is taken against the layout the image was "
              "conditioned on (for text_only: the layout of the example its caption describes; for "
              "text_layout_image: the generated map). \"mIoU vs ground truth\" compares with the example's real "
              "map. FID (segmenter features) is the Frechet distance between generated and real images of the "
              "split in the evaluation segmenter's pooled backbone features: a domain stand-in for Inception "
              "features, not comparable with published FID values. CLIP score needs a local CLIP model "
              "(`--clip_dir`).", ""]
    if metrics.get("images/clip_skipped"):
        lines += ["CLIP score: skipped (no local CLIP model given).", ""]
    lines += _picture(workdir, "evaluation/per_class_iou.png", "per-class image IoU")
    for v in variants:
        pic = _picture(workdir, f"evaluation/samples_{v}.png", f"{v} samples")
        if pic:
            lines += [f"{v}: caption | conditioning layout | generated | real", ""] + pic
    return lines


def _faith_rows(metrics: Dict[str, float]) -> List[tuple]:
    """(label, metrics prefix) of every faithfulness row present, references first."""
    rows = [("ground-truth maps (ceiling)", "images/ground_truth/faith"), ("real images", "images/real/faith")]
    for v in _variants(metrics):
        rows.append((v, f"images/{v}/faith"))
        rows.append((f"{v}: its sampled layouts", f"images/{v}/layout_faith"))
    return [(label, prefix) for label, prefix in rows if f"{prefix}/facts" in metrics]


def faithfulness_section(workdir: str, metrics: Dict[str, float]) -> List[str]:
    rows = _faith_rows(metrics)
    if not rows:
        return []
    lines = ["## Faithfulness", "",
             "The share of what each caption states that holds in the evaluation segmenter's reading of the image "
             "(GenEval-style; `sdsup.evaluation.faithfulness`): the classes it names, \"two\" as two, absolute "
             "positions, relations and colours. \"captions all right\": every fact of the caption holds. "
             "Coherence: the share of thing pixels outside the named things' largest components, components per "
             "named thing (1 is solid; touching pairs read as one) and maps holding a thing the caption never names.",
             "", "| | " + " | ".join(label for _, label in FAITH_COLUMNS) + " |", "|---|" + "---|" * len(FAITH_COLUMNS)]
    for label, prefix in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(metrics.get(f"{prefix}/{m}")) for m, _ in FAITH_COLUMNS) + " |")
    paired = [v for v in _variants(metrics) if f"images/{v}/faith_vs_text_only/difference" in metrics]
    if paired:
        lines += ["", "Pooled fact accuracy minus text_only's on the same captions, seeds and noise (95% bootstrap "
                  "interval over captions):", "", "| variant | difference | 95% interval |", "|---|---|---|"]
        for v in paired:
            key = f"images/{v}/faith_vs_text_only"
            lines.append(f"| {v} | {_fmt(metrics[key + '/difference'])} | "
                         f"{_fmt(metrics.get(key + '/ci_low'))} .. {_fmt(metrics.get(key + '/ci_high'))} |")
    lines += [""] + _picture(workdir, "evaluation/faithfulness.png", "facts that hold, per kind")
    examples = _picture(workdir, "evaluation/faithfulness_examples.png", "facts per image")
    if examples:
        lines += ["caption | sampled layout | text_only image | text_layout_image image (same noise), each with the "
                  "caption's facts ticked (hold) or crossed (do not) in the evaluation segmenter's reading:", ""]
        lines += examples
    return lines


def faithfulness_chart(workdir: str, metrics: Dict[str, float]) -> Optional[str]:
    """evaluation/faithfulness.png: the share of facts that hold per kind, one bar per row."""
    rows = _faith_rows(metrics)
    if not rows:
        return None
    series = {label: [metrics.get(f"{prefix}/{k}") for k in FAITH_KINDS] for label, prefix in rows}
    path = os.path.join(workdir, "evaluation", "faithfulness.png")
    viz.save_png(viz.bar_chart(FAITH_KINDS, series, title="Facts that hold, per kind"), path)
    return path


LAYOUT_STAGES = (("layout", "Text -> layout"), ("planner", "Text -> layout with the object planner"))


def layout_section(workdir: str, metrics: Dict[str, float], stage: str = "layout", title: str = "Text -> layout"
                   ) -> List[str]:
    if f"{stage}/miou_map" not in metrics:
        return []
    lines = [f"## {title}", "", "| metric | test (held-out compositions) | validation |", "|---|---|---|"]
    for name in LAYOUT_ROWS:
        if f"{stage}/{name}" in metrics:
            lines.append(f"| {name} | {_fmt(metrics.get(f'{stage}/{name}'))} | "
                         f"{_fmt(metrics.get(f'{stage}/{name}/val'))} |")
    faith = [m for m in ("map", "sample", "retrieval") if f"{stage}/faith_{m}/facts" in metrics]
    if faith:
        lines += ["", "What the captions state that the maps hold (test; `sdsup.evaluation.faithfulness`):", "",
                  "| maps | " + " | ".join(label for _, label in FAITH_COLUMNS) + " |",
                  "|---|" + "---|" * len(FAITH_COLUMNS)]
        for m in faith:
            lines.append(f"| {m} | " + " | ".join(_fmt(metrics.get(f"{stage}/faith_{m}/{key}"))
                                                 for key, _ in FAITH_COLUMNS) + " |")
    per_class = sorted(k for k in metrics if k.startswith(f"{stage}/iou_map/"))
    if per_class:
        lines += ["", "Per-class IoU on test (most probable map / sampled map / retrieval):", "",
                  "| class | map | sample | retrieval |", "|---|---|---|---|"]
        for key in per_class:
            name = key.rsplit("/", 1)[1]
            lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(f"{stage}/iou_{m}/{name}"))
                                                     for m in ("map", "sample", "retrieval")) + " |")
    lines += [""]
    lines += ["Test examples: caption | ground truth | most probable map | two sampled maps | retrieval", ""]
    lines += _picture(workdir, f"{stage}/report_test.png", "test examples")
    lines += ["Prompts the grammar never writes (most probable map | sampled map):", ""]
    lines += _picture(workdir, f"{stage}/report_novel.png", "novel prompts")
    return lines


def per_class_chart(workdir: str, metrics: Dict[str, float], class_names: Iterable[str]) -> Optional[str]:
    """evaluation/per_class_iou.png: per-class image IoU of every variant; returns its path."""
    class_names = list(class_names)
    variants = _variants(metrics)
    if not variants:
        return None
    series = {v: [metrics.get(f"images/{v}/iou/{c}") for c in class_names] for v in variants}
    path = os.path.join(workdir, "evaluation", "per_class_iou.png")
    viz.save_png(viz.bar_chart(class_names, series, title="Per-class image IoU (evaluation segmenter)"), path)
    return path


def write_report(workdir: str, class_names: Optional[Iterable[str]] = None) -> str:
    """Rebuilds WORKDIR/report.md from metrics.json, the pictures and the recorded command."""
    metrics = read_metrics(workdir)
    if class_names is not None:
        per_class_chart(workdir, metrics, class_names)
    faithfulness_chart(workdir, metrics)
    lines = ["# sdsup evaluation report", "",
             f"Workdir: `{os.path.abspath(workdir)}`. All numbers are also in `metrics.json`.", ""]
    lines += image_section(workdir, metrics, class_names)
    lines += faithfulness_section(workdir, metrics)
    for stage, title in LAYOUT_STAGES:
        lines += layout_section(workdir, metrics, stage, title)
    prov = read_provenance(workdir)
    if prov:
        lines += ["## Command and config", "", "```", prov.get("command", ""), "```", ""]
        if "config" in prov:
            lines += ["<details><summary>config</summary>", "", "```json",
                      json.dumps(prov["config"], indent=1, sort_keys=True, default=str), "```", "", "</details>", ""]
    path = os.path.join(workdir, REPORT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    return path

