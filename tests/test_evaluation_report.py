"""metrics.json / report.md plumbing, bar charts and the ablation's bookkeeping (no models needed)."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from sdsup import viz
from sdsup.evaluation import report
from sdsup.experiments import ablation

CLASSES = ("sky", "grass", "car")


def test_metrics_merge_atomically_and_keep_other_keys(tmp_path):
    report.merge_metrics(str(tmp_path), {"layout/miou_map": 0.5, "x": float("nan")})
    merged = report.merge_metrics(str(tmp_path), {"images/control/image_miou": 0.25})
    assert merged == {"layout/miou_map": 0.5, "x": None, "images/control/image_miou": 0.25}
    assert json.loads((tmp_path / "metrics.json").read_text()) == merged
    assert not list(tmp_path.glob("*.tmp"))


def test_report_is_rebuilt_from_metrics_with_pictures_and_command(tmp_path, monkeypatch):
    metrics = {"images/real/miou": 0.8}
    for v, m in (("text_only", 0.1), ("control", 0.4), ("text_layout_image", 0.3)):
        metrics.update({f"images/{v}/image_miou": m, f"images/{v}/layout_miou": m / 2,
                        f"images/{v}/fid_segfeat": 10 * m, f"images/{v}/examples": 16})
        metrics.update({f"images/{v}/iou/{c}": (None if c == "car" and v == "text_only" else m) for c in CLASSES})
    metrics.update({"layout/miou_map": 0.41, "layout/miou_map/val": 0.45, "layout/miou_retrieval": 0.2,
                    "layout/iou_map/sky": 0.9, "layout/iou_sample/sky": 0.8, "layout/iou_retrieval/sky": 0.7})
    report.merge_metrics(str(tmp_path), metrics)
    monkeypatch.setattr("sys.argv", ["/x/sdsup/evaluate.py", "--workdir=W"])
    report.record_command(str(tmp_path), ml_collections.ConfigDict({"seed": 3}), split="test")
    path = report.write_report(str(tmp_path), CLASSES)
    text = open(path).read()
    # Variants in the pipeline's order, each with its numbers; the ceiling row; the layout table.
    assert text.index("| text_only |") < text.index("| control |") < text.index("| text_layout_image |")
    assert "| control | 0.400 | 0.200 | 4.00 | n/a | n/a |" in text
    assert "real images (ceiling) | 0.800" in text
    assert "| miou_map | 0.410 | 0.450 |" in text and "| sky | 0.900 | 0.800 | 0.700 |" in text
    assert "python -m sdsup.evaluate --workdir=W" in text and '"seed": 3' in text
    assert "Split: test (held-out compositions)" in text
    # The per-class chart exists and the report links it.
    assert (tmp_path / "evaluation" / "per_class_iou.png").stat().st_size > 500
    assert "evaluation/per_class_iou.png" in text


def test_bar_chart_marks_missing_values_and_scales_with_series():
    one = viz.bar_chart(list(CLASSES), {"a": [0.5, None, 1.0]})
    two = viz.bar_chart(list(CLASSES), {"a": [0.5, float("nan"), 1.0], "b": [0.0, 0.2, 2.0]})
    assert one.dtype == np.uint8 and one.shape[2] == 3
    assert two.shape[0] > one.shape[0]  # one bar more per class
    blue = np.all(one == np.array(viz.SERIES_COLOURS[0], np.uint8), axis=-1)
    # Full-scale bar (1.0) is twice as long as the half one (0.5), up to a pixel.
    rows = [r for r in range(one.shape[0]) if blue[r].any()]
    lengths = sorted({int(blue[r].sum()) for r in rows if blue[r].sum() > 12})
    assert len(lengths) == 2 and abs(lengths[1] - 2 * lengths[0]) <= 2


def _result(miou, fid):
    return {"image_miou": miou, "layout_miou": miou - 0.1, "fid_segfeat": fid}


def test_ablation_summary_target_and_discussion_say_what_the_numbers_say():
    results = {"text_only": [_result(0.1, 9.0), _result(0.12, 9.5)],
               "control": [_result(0.30, 5.0), _result(0.32, 5.2)],
               "aldm": [_result(0.38, 5.3), _result(0.40, 5.5)],
               "text_layout_image": [_result(0.25, 6.0), _result(0.27, 6.1)]}
    summary = ablation.summarize(results)
    assert summary["aldm"]["image_miou"]["mean"] == pytest.approx(0.39)
    assert summary["aldm"]["image_miou"]["std"] == pytest.approx(0.01)
    assert summary["control"]["fid"]["values"] == [5.0, 5.2]
    target = ablation.target_check(summary)
    assert target["image_miou_gain"] == pytest.approx(0.08) and target["fid_ratio"] == pytest.approx(5.4 / 5.1)
    assert target["met"]
    text = " ".join(ablation.discussion({"variants": summary, "target": target, "seeds": 2}))
    assert "+8.0 points" in text and "is met" in text
    # A gain inside the seed spread, or a FID blow-up, is reported as such.
    results["aldm"] = [_result(0.28, 8.0), _result(0.40, 8.0)]
    summary = ablation.summarize(results)
    target = ablation.target_check(summary)
    assert not target["met"]
    text = " ".join(ablation.discussion({"variants": summary, "target": target, "seeds": 2}))
    assert "NOT met" in text and "not a reliable effect" in text


def test_shared_stages_are_linked_and_only_a_matching_workdir_is_reused(tmp_path):
    shared, run = tmp_path / "shared", tmp_path / "runs" / "control_s0"
    for name in ("vae", "ldm"):
        (shared / name).mkdir(parents=True)
        (shared / name / "DONE.json").write_text("{}")
    ablation.link_shared(str(shared), str(run), ["vae", "ldm"])
    ablation.link_shared(str(shared), str(run), ["vae", "ldm"])  # idempotent
    assert os.path.islink(run / "vae") and (run / "vae" / "DONE.json").exists()
    assert not os.path.isabs(os.readlink(run / "vae"))
    (run / "control").mkdir()
    with pytest.raises(ablation.AblationError, match="not a link"):
        ablation.link_shared(str(shared), str(run), ["control"])

    config = ml_collections.ConfigDict({"seed": 0, "data": {"name": "scenes"}, "vae": {"lr": 1.0},
                                        "control": {"lambda_adv": 0.5}})
    with pytest.raises(ablation.AblationError, match="no config.json"):
        ablation.check_reusable(config, str(shared), ["vae", "ldm"])
    other = config.to_dict()
    other["control"]["lambda_adv"] = 0.0  # the control section is not shared: still reusable
    (shared / "config.json").write_text(json.dumps(other))
    ablation.check_reusable(config, str(shared), ["vae", "ldm"])
    other["vae"]["lr"] = 2.0
    (shared / "config.json").write_text(json.dumps(other))
    with pytest.raises(ablation.AblationError, match="another config.vae"):
        ablation.check_reusable(config, str(shared), ["vae", "ldm"])
    (shared / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(ablation.AblationError, match="stage evalseg has not finished"):
        ablation.check_reusable(config, str(shared), ["vae", "evalseg"])


def test_variant_configs_differ_in_seed_and_lambda_only():
    config = ml_collections.ConfigDict({"seed": 5, "control": {"lambda_adv": 0.5, "n_lazy": 8}})
    v = ablation.variant_config(config, 2, 0.0)
    assert v.seed == 7 and v.control.lambda_adv == 0.0 and v.control.n_lazy == 8
    assert config.seed == 5 and config.control.lambda_adv == 0.5  # the original is untouched
    assert not math.isnan(v.control.lambda_adv)
