"""The procedural scenes: determinism, held-out compositions, captions, flips."""

import numpy as np
import pytest

from sdsup.data import scenes, tokenizers


def test_examples_are_a_pure_function_of_seed_split_and_index():
    a = scenes.make_example(3, "train", 17, 32)
    b = scenes.make_example(3, "train", 17, 32)
    c = scenes.make_example(3, "train", 18, 32)
    d = scenes.make_example(4, "train", 17, 32)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert a["caption"] == b["caption"] and a["scene"] == b["scene"]
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["image"], d["image"])


@pytest.mark.parametrize("size", [16, 32, 64, 96])
def test_render_sizes_and_label_range(size):
    ex = scenes.make_example(0, "validation", 5, size)
    assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].shape == (size, size) and ex["label"].dtype == np.uint8
    ids = set(np.unique(ex["label"]).tolist())
    assert ids <= set(range(len(scenes.CLASS_NAMES))) | {scenes.IGNORE_ID}
    assert (ex["label"] == scenes.IGNORE_ID).mean() < 0.1


def test_held_out_is_closed_under_flip():
    for a, rel, b in scenes.HELD_OUT:
        if rel == scenes.LEFT_OF:
            assert (b, rel, a) in scenes.HELD_OUT


def test_held_out_compositions_never_in_train_or_validation_and_always_stated_in_test():
    for split in ("train", "validation"):
        for i in range(1500):
            scene = scenes.sample_scene(scenes.example_rng(0, split, i), split)
            assert not scenes.facts(scene) & scenes.HELD_OUT
            assert not scenes.facts(scenes.flip_scene(scene)) & scenes.HELD_OUT
    for i in range(300):
        scene = scenes.sample_scene(scenes.example_rng(0, "test", i), "test")
        held = scenes.facts(scene) & scenes.HELD_OUT
        assert held
        # The caption places one member of a held-out pair against the other.
        stated = [(g.cls, scene.groups[g.ref].cls) for g in scene.groups if g.ref is not None]
        assert any({s, o} == {a, b} for s, o in stated for a, _, b in held)


def test_caption_names_every_class_in_the_label_map():
    tok = tokenizers.WordTokenizer.scenes(64)
    for i in range(200):
        ex = scenes.make_example(1, "train", i, 32)
        words = set(tok.words(ex["caption"]))
        words |= {w[:-1] for w in words if w.endswith("s")}  # plurals
        words |= {"house"} if "houses" in words else set()
        words |= {"water"} if "lake" in words else set()
        present = set(np.unique(ex["label"]).tolist()) - {scenes.IGNORE_ID}
        for cid in present:
            assert scenes.CLASS_NAMES[cid] in words, (ex["caption"], scenes.CLASS_NAMES[cid])


def test_caption_of_flipped_scene_swaps_left_and_right():
    for i in range(200):
        scene = scenes.sample_scene(scenes.example_rng(0, "train", i), "train")
        assert scenes.caption(scenes.flip_scene(scene)) == scenes.swap_left_right(scenes.caption(scene))


def test_positions_in_captions_match_the_rendered_layout():
    """A thing placed "on the left" has its pixels left of centre, and so on."""
    checked = 0
    for i in range(300):
        rng = scenes.example_rng(2, "train", i)
        scene = scenes.sample_scene(rng, "train")
        _, label = scenes.render(scene, 64, rng)
        for g in scene.groups:
            ys, xs = np.nonzero(label == scenes.CLASS_ID[g.cls])
            if g.ref is not None or len(xs) < 4:
                continue
            expected = scenes.SLOT_X[g.slot]
            assert abs(xs.mean() / 64 - expected) < 0.17, (scenes.caption(scene), g)
            checked += 1
    assert checked > 100


def test_shipped_vocabulary_matches_the_grammar(tmp_path):
    path = tmp_path / "vocab.txt"
    tokenizers.write_scenes_vocab(str(path))
    shipped = tokenizers.WordTokenizer.scenes(64).vocab
    assert tuple(path.read_text().split("\n")[:-1]) == shipped
