"""The faithfulness check (sdsup.evaluation.faithfulness) and the facts captions state (sdsup.data.facts).

The check must score the ground truth as faithful (its own ceiling), read touching pairs as two, ignore
specks, see an unnamed thing, and pair variants on the same captions.
"""

import numpy as np
import pytest

from sdsup.data import facts as facts_lib
from sdsup.data import registry, scenes
from sdsup.evaluation import faithfulness, report

SPEC = registry.SCENES
NAMES = SPEC.class_names


@pytest.fixture(scope="module")
def calibration():
    train = [scenes.make_example(0, "train", i, 64) for i in range(300)]
    return faithfulness.Calibration.fit([e["label"] for e in train], [scenes.caption_facts(e) for e in train], NAMES)


def test_scene_captions_state_every_kind_of_fact():
    seen = set()
    for i in range(40):
        record = scenes.make_example(0, "test", i, 32)
        stated = scenes.caption_facts(record)
        seen |= {f.kind for f in stated}
        for f in stated:
            if f.kind == "count":
                assert f.text.startswith("two ") and f.count == 2
            if f.kind == "relation" and f.cls != "sky":
                assert f"{f.relation} the" in record["caption"]
    assert seen == set(facts_lib.KINDS)


def test_ground_truth_maps_and_real_pixels_hold_their_captions(calibration):
    scored = faithfulness.Scored()
    for i in range(150):
        e = scenes.make_example(0, "test", i, 64)
        scored.add(faithfulness.MapReader(e["label"], calibration, NAMES, image=e["image"]), scenes.caption_facts(e),
                   SPEC.thing_classes)
    summary = scored.summary()
    assert summary["facts"] >= 0.98 and summary["count"] >= 0.95 and summary["colour"] >= 0.95, summary
    assert summary["relation"] >= 0.98 and summary["unnamed_things"] == 0.0 and summary["stray_share"] == 0.0


def _house(label, x0, width=12, top=30, bottom=42):
    label[top:bottom, x0:x0 + width] = NAMES.index("house")


def test_pairs_specks_and_unnamed_things(calibration):
    fact_two = facts_lib.Fact("count", "two houses", "house", count=2, size="medium")
    base = np.zeros((64, 64), np.uint8)
    base[40:] = NAMES.index("grass")
    apart = base.copy()
    _house(apart, 8)
    _house(apart, 30)
    assert faithfulness.MapReader(apart, calibration, NAMES).check(fact_two)
    touching = base.copy()
    _house(touching, 20, width=26)  # one blob as wide as two houses side by side
    assert faithfulness.MapReader(touching, calibration, NAMES).check(fact_two)
    single = base.copy()
    _house(single, 20)
    reader = faithfulness.MapReader(single, calibration, NAMES)
    assert not reader.check(fact_two) and reader.count("house", "medium") == 1
    speck = base.copy()
    speck[5, 5] = NAMES.index("car")  # one stray pixel: below any car's size, not an object
    reader = faithfulness.MapReader(speck, calibration, NAMES)
    assert not reader.check(facts_lib.Fact("object", "car", "car"))
    coherence = reader.coherence([facts_lib.Fact("object", "house", "house")], SPEC.thing_classes)
    assert coherence["stray_share"] == 1.0 and coherence["unnamed_things"] == 0.0
    unnamed = single.copy()
    unnamed[44:52, 40:52] = NAMES.index("car")
    coherence = faithfulness.MapReader(unnamed, calibration, NAMES).coherence(
        [facts_lib.Fact("object", "house", "house")], SPEC.thing_classes)
    assert coherence["unnamed_things"] == 1.0 and coherence["components_per_thing"] == 1.0


def test_positions_relations_and_colours(calibration):
    label = np.zeros((64, 64), np.uint8)
    label[40:] = NAMES.index("grass")
    label[44:52, 4:16] = NAMES.index("car")
    label[30:42, 44:56] = NAMES.index("house")
    image = np.zeros((64, 64, 3), np.uint8)
    image[label == NAMES.index("car")] = scenes.COLOURS["blue"]
    reader = faithfulness.MapReader(label, calibration, NAMES, image=image)
    choices = tuple((c, scenes.COLOURS[c]) for c in scenes.THING_COLOURS["car"])
    F = facts_lib.Fact
    assert reader.check(F("position", "car on the left", "car", where="left"))
    assert not reader.check(F("position", "car on the right", "car", where="right"))
    assert reader.check(F("relation", "car left of the house", "car", relation="left of", other="house"))
    assert not reader.check(F("relation", "car above the house", "car", relation="above", other="house"))
    assert reader.check(F("colour", "blue car", "car", colour="blue", colour_choices=choices))
    assert not reader.check(F("colour", "red car", "car", colour="red", colour_choices=choices))
    # A map without its image cannot show colours: not checked, not failed.
    assert faithfulness.MapReader(label, calibration, NAMES).check(
        F("colour", "red car", "car", colour="red", colour_choices=choices)) is None


def test_real_datasets_state_the_classes_their_captions_name():
    names = ("wall", "building, edifice", "sky", "car, auto, automobile", "person")
    stated = facts_lib.named_class_facts("Two cars parked by a tall Building under the sky.", names)
    assert [f.cls for f in stated] == ["building, edifice", "sky", "car, auto, automobile"]
    assert all(f.kind == "object" for f in stated)
    with pytest.raises(ValueError, match="relation"):
        facts_lib.Fact("relation", "a car near the wall", "car", relation="near", other="wall")


def test_paired_difference_and_the_report(tmp_path, calibration):
    rng = np.random.default_rng(0)
    good, bad = faithfulness.Scored(), faithfulness.Scored()
    for i in range(60):
        e = scenes.make_example(0, "validation", i, 64)
        stated = scenes.caption_facts(e)
        good.add(faithfulness.MapReader(e["label"], calibration, NAMES), stated)
        noise = rng.integers(0, len(NAMES), e["label"].shape).astype(np.uint8)
        bad.add(faithfulness.MapReader(noise, calibration, NAMES), stated)
    d = faithfulness.paired_difference(good, bad)
    assert d["ci_low"] > 0.3 and d["ci_low"] <= d["difference"] <= d["ci_high"] and d["captions"] == 60
    same = faithfulness.paired_difference(good, good)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0.0

    metrics = {"images/text_only/image_miou": 0.1, "images/text_layout_image/image_miou": 0.2}
    for row, scored in (("ground_truth", good), ("text_only", bad), ("text_layout_image", good)):
        metrics.update({f"images/{row}/faith/{k}": v for k, v in scored.summary().items()})
    metrics.update({f"images/text_layout_image/faith_vs_text_only/{k}": d[k] for k in ("difference", "ci_low", "ci_high")})
    report.merge_metrics(str(tmp_path), metrics)
    text = open(report.write_report(str(tmp_path), NAMES)).read()
    assert "## Faithfulness" in text and "| ground-truth maps (ceiling) |" in text
    assert f"| text_layout_image | {d['difference']:.3f} |" in text
    assert "ground_truth" not in text.split("## Faithfulness")[0]  # a reference row, not a variant
    assert (tmp_path / "evaluation" / "faithfulness.png").stat().st_size > 1000
