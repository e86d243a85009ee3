"""The real-dataset builders (sdsup.data.real) on tiny copies of each dataset, written here in the datasets' own
on-disk layouts: extracted folders and the zips they ship as."""

import io
import json
import os
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sdsup.data import pipeline, registry
from sdsup.data.real import classes

# ----------------------------------------------------------------------------
# Files in the datasets' formats.
# ----------------------------------------------------------------------------
H, W = 12, 16


def jpeg(seed: int, h: int = H, w: int = W) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_rgb(seed: int, h: int = H, w: int = W) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_ids(ids) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(ids, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def label(*values) -> np.ndarray:
    """An H x W label map holding `values` in horizontal bands."""
    out = np.zeros((H, W), np.uint8)
    for i, v in enumerate(values):
        out[i * H // len(values):(i + 1) * H // len(values)] = v
    return out


def write_tree(root, members: dict) -> None:
    for rel, data in members.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def write_zip(path, members: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in members.items():
            zf.writestr(rel, data)


def write_json(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def config(name, path, data_dir, **kw):
    """A config's `data` section with the keys the real datasets read."""
    values = dict(captions=None, missing_captions="error", validation_fraction=0.1, seed=0)
    values.update(kw)
    return ml_collections.ConfigDict(dict(name=name, path=str(path), data_dir=str(data_dir), **values))


def build(cfg):
    spec = registry.for_config(cfg)
    return spec, registry.prepare(spec, cfg)


def records(spec, builder, split):
    source = registry.data_source(spec, builder, split)
    return [source[i] for i in range(len(source))]


def ids_of(record) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(record["label"])))


def text(value) -> str:
    return pipeline.text(value)


# ----------------------------------------------------------------------------
# ADE20K
# ----------------------------------------------------------------------------
def ade_members(prefix="ADEChallengeData2016/"):
    m = {}
    for split, sub, n in (("train", "training", 3), ("val", "validation", 2)):
        for i in range(1, n + 1):
            stem = f"ADE_{split}_{i:08d}"
            m[f"{prefix}images/{sub}/{stem}.jpg"] = jpeg(i + 10 * (split == "val"))
            m[f"{prefix}annotations/{sub}/{stem}.png"] = png_ids(label(0, 3, 150, i))
    m[f"{prefix}objectInfo150.txt"] = b"Idx\tRatio\tTrain\tVal\tName\n"
    return m


ADE_CAPTIONS = {"ADE_train_00000001": "a kitchen", "ADE_train_00000002": ["a road", "a street"],
                "ADE_train_00000003": "a bedroom", "ADE_val_00000001": "a lake", "ADE_val_00000002": "a hall",
                "ADE_val_09999999": "an image this copy does not have"}


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """ADE20K extracted and zipped, the captions, and a build of each."""
    root = tmp_path_factory.mktemp("ade")
    members = ade_members()
    write_tree(root / "extracted", members)
    write_zip(str(root / "zipped" / "ADEChallengeData2016.zip"), members)
    captions = write_json(root / "ade20k_caption_train.json", ADE_CAPTIONS)
    built = {form: build(config("ade20k", root / form, root / "tfds", captions=captions))
             for form in ("extracted", "zipped")}
    return root, members, captions, built


def test_ade20k_builds_records_in_the_common_layout(ade):
    _, members, _, built = ade
    spec, builder = built["extracted"]
    assert (builder.info.splits["train"].num_examples, builder.info.splits["validation"].num_examples) == (3, 2)
    train = records(spec, builder, "train")
    assert [text(r["id"]) for r in train] == ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"]
    assert [int(r["index"]) for r in train] == [0, 1, 2]
    r = train[1]
    assert r["image"] == members["ADEChallengeData2016/images/training/ADE_train_00000002.jpg"]  # the file itself
    ids = ids_of(r)
    # raw 0 ("other") -> 255, raw 3 -> 2, raw 150 -> 149, raw 2 -> 1
    np.testing.assert_array_equal(ids, np.vectorize({0: 255, 3: 2, 150: 149, 2: 1}.get)(label(0, 3, 150, 2)))
    assert text(r["caption"]) == "a road" and json.loads(text(r["captions"])) == ["a road", "a street"]
    assert json.loads(text(train[0]["captions"])) == ["a kitchen"]
    meta = builder.info.metadata
    assert meta["class_names"][:4] == ["wall", "building", "sky", "floor"] and meta["ignore_id"] == 255
    assert len(meta["palette"]) == 150
    # The input pipeline decodes, resizes and crops the records at read time, and reads their captions.
    batch = next(pipeline.eval_batches(registry.data_source(spec, builder, "train"), tokenizer=_Tokens(),
                                       global_batch_size=3, caption_field=spec.caption_field,
                                       geometry=pipeline.Geometry(8)))
    assert batch["image"].shape == (3, 8, 8, 3) and batch["label"].shape == (3, 8, 8)
    assert set(np.unique(batch["label"]).tolist()) <= {0, 1, 2, 149, 255}
    assert batch["caption"] == ["a kitchen", "a road", "a bedroom"]


class _Tokens:
    def encode(self, caption):
        return np.zeros(4, np.int32)


def test_ade20k_zip_and_extracted_folder_give_the_same_records(ade):
    _, _, _, built = ade
    (spec, extracted), (_, zipped) = built["extracted"], built["zipped"]
    assert extracted.data_dir != zipped.data_dir  # another data.path is another build
    for split in spec.splits:
        a, b = records(spec, extracted, split), records(spec, zipped, split)
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            assert set(ra) == set(rb) == {"image", "label", "caption", "captions", "id", "index"}
            assert all(ra[k] == rb[k] for k in ra)


def test_ade20k_spec_and_palette_tie_rule():
    spec = registry.get("ade20k")
    assert spec.num_classes == 150 and spec.ignore_id == 255 and spec.builds_offline
    assert spec.splits == ("train", "validation") and spec.flip_caption is None and spec.default_tokenizer == "clip"
    assert spec.class_names[6] == "road" and spec.class_names[48] == "skyscraper"
    # ControlNet's ADE palette has one colour twice; reading colours back, the lower id wins.
    assert spec.palette[6] == spec.palette[48] == (140, 140, 140)
    assert [i for i, c in enumerate(spec.palette) if c == (140, 140, 140)] == [6, 48]
    table = classes.colour_table(spec.palette)
    assert table[(140, 140, 140)] == 6
    assert all(table[c] == i for i, c in enumerate(spec.palette) if i != 48)
    rgb = np.array([[[140, 140, 140], [120, 120, 120], [1, 2, 3]]], np.uint8)
    np.testing.assert_array_equal(classes.colours_to_ids(rgb, spec.palette), [[6, 0, -1]])


def test_missing_dataset_names_both_layouts_and_what_was_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "images").mkdir()
    with pytest.raises(registry.DatasetError) as e:
        build(config("ade20k", tmp_path, tmp_path / "tfds", missing_captions="empty"))
    msg = str(e.value)
    assert "ADEChallengeData2016.zip" in msg and "images/training" in msg and "annotations/validation" in msg
    assert "notes.txt" in msg and "images/" in msg


def test_data_path_not_set(tmp_path):
    for name in ("ade20k", "cityscapes", "coco_stuff", "folder"):
        cfg = config(name, "", tmp_path)
        with pytest.raises(registry.DatasetError, match="set data.path"):
            registry.get(name).make_builder(cfg) if name != "folder" else registry.for_config(cfg)


def test_unpaired_images_and_label_maps_are_counted_and_named(tmp_path):
    members = ade_members()
    del members["ADEChallengeData2016/annotations/training/ADE_train_00000002.png"]
    del members["ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"]
    write_tree(tmp_path / "ade", members)
    with pytest.raises(registry.DatasetError,
                       match=r"split train: 1 images have no label map \(first: ADE_train_00000002\)"):
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", missing_captions="empty"))
    members = ade_members()
    del members["ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"]
    write_tree(tmp_path / "ade2", members)
    with pytest.raises(registry.DatasetError,
                       match=r"split validation: 1 label maps have no image \(first: ADE_val_00000001\)"):
        build(config("ade20k", tmp_path / "ade2", tmp_path / "tfds", missing_captions="empty"))


def test_label_ids_outside_the_dataset_name_the_file_and_ids(tmp_path):
    members = ade_members()
    members["ADEChallengeData2016/annotations/training/ADE_train_00000003.png"] = png_ids(label(1, 151, 200))
    write_tree(tmp_path / "ade", members)
    with pytest.raises(registry.DatasetError) as e:
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", missing_captions="empty"))
    assert "ADE_train_00000003.png" in str(e.value) and "[151, 200]" in str(e.value)


def test_files_that_do_not_decode_are_named(tmp_path):
    members = ade_members()
    good = members["ADEChallengeData2016/images/training/ADE_train_00000002.jpg"]
    members["ADEChallengeData2016/images/training/ADE_train_00000002.jpg"] = good[: len(good) // 2]  # truncated
    write_tree(tmp_path / "ade", members)
    with pytest.raises(registry.DatasetError, match=r"image .*ADE_train_00000002\.jpg does not decode"):
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", missing_captions="empty"))
    members = ade_members()
    members["ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"] = b"\x89PNG\r\n\x1a\nnot really"
    write_zip(str(tmp_path / "zipped" / "ADEChallengeData2016.zip"), members)
    with pytest.raises(registry.DatasetError, match=r"label map .*ADEChallengeData2016\.zip:.*ADE_val_00000002\.png "
                                                    r"does not decode"):
        build(config("ade20k", tmp_path / "zipped", tmp_path / "tfds", missing_captions="empty"))
    members = ade_members()
    members["ADEChallengeData2016/annotations/training/ADE_train_00000001.png"] = png_rgb(1)  # a colour picture
    write_tree(tmp_path / "ade3", members)
    with pytest.raises(registry.DatasetError, match=r"ADE_train_00000001\.png has mode RGB .*one-channel"):
        build(config("ade20k", tmp_path / "ade3", tmp_path / "tfds", missing_captions="empty"))


def test_caption_files_that_are_not_json_or_have_the_wrong_shape(tmp_path):
    write_tree(tmp_path / "ade", ade_members())
    bad = tmp_path / "bad.json"
    bad.write_text('{"ADE_train_00000001": "a kitchen",\n oops}')
    with pytest.raises(registry.DatasetError, match=r"bad\.json is not valid JSON.*line 2"):
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", captions=str(bad)))
    wrong = write_json(tmp_path / "wrong.json", {"ADE_train_00000001": "ok", "ADE_train_00000002": {"text": "x"}})
    with pytest.raises(registry.DatasetError, match=r"wrong\.json: the value of key 'ADE_train_00000002' is an object"):
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", captions=wrong))
    listed = write_json(tmp_path / "list.json", ["a", "b"])
    with pytest.raises(registry.DatasetError, match=r"list\.json holds a JSON array; expected an object"):
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", captions=listed))
    with pytest.raises(registry.DatasetError, match=r"caption file .*nowhere\.json does not exist"):
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", captions=str(tmp_path / "nowhere.json")))


def test_images_without_captions(tmp_path):
    write_tree(tmp_path / "ade", ade_members())
    part = write_json(tmp_path / "part.json", {"ADE_train_00000001": "a kitchen", "ADE_val_00000002": "a hall"})
    with pytest.raises(registry.DatasetError) as e:
        build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", captions=part))
    msg = str(e.value)
    assert "3 images have no caption" in msg and "train: 2, validation: 1" in msg
    assert "ADE_train_00000002, ADE_train_00000003, ADE_val_00000001" in msg and "missing_captions='empty'" in msg
    # Merged files: the second adds captions; "empty" lets the rest through with "".
    more = write_json(tmp_path / "more.json",
                      {"ADE_train_00000001": ["a kitchen", "a room"], "ADE_train_00000002": "a road"})
    spec, builder = build(config("ade20k", tmp_path / "ade", tmp_path / "tfds", captions=f"{part}, {more}",
                                 missing_captions="empty"))
    train = records(spec, builder, "train")
    assert [json.loads(text(r["captions"])) for r in train] == [["a kitchen", "a room"], ["a road"], [""]]
    assert text(train[2]["caption"]) == ""


def test_a_failed_build_leaves_a_finished_one_untouched(tmp_path):
    members = ade_members()
    write_tree(tmp_path / "ade", members)
    caps = write_json(tmp_path / "caps.json", ADE_CAPTIONS)
    cfg = config("ade20k", tmp_path / "ade", tmp_path / "tfds", captions=caps)
    spec, builder = build(cfg)
    before = records(spec, builder, "train")
    finished = sorted(os.listdir(builder.data_dir))
    # Other captions are another build (of the same files, into the same data_dir); its corrupt label fails it.
    members["ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"] = b"garbage"
    write_tree(tmp_path / "ade_bad", members)
    other = write_json(tmp_path / "other.json", dict(ADE_CAPTIONS, ADE_train_00000001="another kitchen"))
    bad = config("ade20k", tmp_path / "ade_bad", tmp_path / "tfds", captions=other)
    with pytest.raises(registry.DatasetError, match="ADE_val_00000002.png does not decode"):
        build(bad)
    failed = registry.get("ade20k").make_builder(bad)
    assert failed.data_dir != builder.data_dir and not failed.is_prepared()
    assert not os.path.exists(failed.data_dir)
    spec, again = build(cfg)  # the finished one: reused, complete, same records
    assert again.data_dir == builder.data_dir and sorted(os.listdir(again.data_dir)) == finished
    assert records(spec, again, "train") == before


# ----------------------------------------------------------------------------
# Cityscapes
# ----------------------------------------------------------------------------
CITY = {"train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
        "val": ["frankfurt_000000_000576", "lindau_000000_000019"]}


def cityscapes_members():
    images, labels = {}, {}
    for split, stems in CITY.items():
        for i, stem in enumerate(stems):
            city = stem.split("_")[0]
            images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = png_rgb(i)
            labels[f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"] = png_ids(label(26, 0, 7, 33, 24 + i))
            labels[f"gtFine/{split}/{city}/{stem}_gtFine_color.png"] = png_rgb(i)
            labels[f"gtFine/{split}/{city}/{stem}_gtFine_instanceIds.png"] = png_ids(label(1))
            labels[f"gtFine/{split}/{city}/{stem}_gtFine_polygons.json"] = b"{}"
    images["leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png"] = png_rgb(9)  # not read
    images["README"] = labels["README"] = labels["license.txt"] = b"text"
    return images, labels


def test_cityscapes_from_zips_and_folders(tmp_path):
    images, labels = cityscapes_members()
    write_zip(str(tmp_path / "zipped" / "leftImg8bit_trainvaltest.zip"), images)
    write_zip(str(tmp_path / "zipped" / "gtFine_trainvaltest.zip"), labels)
    write_tree(tmp_path / "extracted", dict(images, **labels))
    caps = write_json(tmp_path / "cityscapes_caption_train.json",
                      {s: f"a street in {s.split('_')[0]}" for stems in CITY.values() for s in stems})
    spec, zipped = build(config("cityscapes", tmp_path / "zipped", tmp_path / "tfds", captions=caps))
    assert spec.num_classes == 19 and spec.class_names[13] == "car" and spec.palette[13] == (0, 0, 142)
    assert (zipped.info.splits["train"].num_examples, zipped.info.splits["validation"].num_examples) == (3, 2)
    val = records(spec, zipped, "validation")
    assert text(val[0]["id"]) == "frankfurt_000000_000576" and text(val[0]["caption"]) == "a street in frankfurt"
    assert val[0]["image"] == images["leftImg8bit/val/frankfurt/frankfurt_000000_000576_leftImg8bit.png"]
    # labelId 26 (car) -> 13, 0 (unlabeled) -> 255, 7 (road) -> 0, 33 (bicycle) -> 18, 24 (person) -> 11, 25 -> 12
    np.testing.assert_array_equal(ids_of(val[0]), label(13, 255, 0, 18, 11))
    np.testing.assert_array_equal(ids_of(val[1]), label(13, 255, 0, 18, 12))
    _, extracted = build(config("cityscapes", tmp_path / "extracted", tmp_path / "tfds", captions=caps))
    for split in spec.splits:
        assert records(spec, extracted, split) == records(spec, zipped, split)


def test_cityscapes_missing_label_zip(tmp_path):
    images, _ = cityscapes_members()
    write_zip(str(tmp_path / "leftImg8bit_trainvaltest.zip"), images)
    with pytest.raises(registry.DatasetError) as e:
        build(config("cityscapes", tmp_path, tmp_path / "tfds", missing_captions="empty"))
    assert "gtFine_trainvaltest.zip" in str(e.value) and "gtFine/train/" in str(e.value)
    assert "leftImg8bit_trainvaltest.zip" in str(e.value)  # what data.path holds


def test_cityscapes_lut_follows_cityscapes_scripts():
    lut = classes.cityscapes_lut()
    label_ids = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    assert [int(lut[i]) for i in label_ids] == list(range(19))
    assert all(lut[i] == 255 for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 255))
    assert lut[34] == -1


# ----------------------------------------------------------------------------
# COCO-Stuff
# ----------------------------------------------------------------------------
COCO = {"train2017": [9, 25, 30], "val2017": [139, 285]}


def coco_members():
    images, stuff, annotations = {}, {}, {}
    for sub, ids in COCO.items():
        doc = {"info": {}, "images": [], "annotations": []}
        for i, image_id in enumerate(ids):
            stem = f"{image_id:012d}"
            images[f"{sub}/{stem}.jpg"] = jpeg(image_id)
            stuff[f"{sub}/{stem}.png"] = png_ids(label(12, 0, 181, 11, 255, 91 + i))
            doc["images"].append({"id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W})
            for k in range(3):  # annotation ids out of order: captions come in id order
                doc["annotations"].append({"id": 100 * image_id + (2 - k), "image_id": image_id,
                                           "caption": f"caption {2 - k} of {image_id} "})
        annotations[f"annotations/captions_{sub}.json"] = json.dumps(doc).encode()
        annotations[f"annotations/instances_{sub}.json"] = b"{}"
    return images, stuff, annotations


def test_coco_stuff_from_zips_and_folders(tmp_path):
    images, stuff, annotations = coco_members()
    for sub in COCO:
        write_zip(str(tmp_path / "zipped" / f"{sub}.zip"), {k: v for k, v in images.items() if k.startswith(sub)})
    write_zip(str(tmp_path / "zipped" / "stuffthingmaps_trainval2017.zip"), stuff)
    write_zip(str(tmp_path / "zipped" / "annotations_trainval2017.zip"), annotations)
    write_tree(tmp_path / "extracted", images)
    write_tree(tmp_path / "extracted" / "stuffthingmaps_trainval2017", stuff)
    write_tree(tmp_path / "extracted", annotations)
    spec, zipped = build(config("coco_stuff", tmp_path / "zipped", tmp_path / "tfds"))
    assert spec.num_classes == 171 and len(set(spec.palette)) == 171
    assert spec.class_names[11] == "stop sign" and spec.phrases[spec.class_names.index("wall-other")] == "wall"
    assert (zipped.info.splits["train"].num_examples, zipped.info.splits["validation"].num_examples) == (3, 2)
    train = records(spec, zipped, "train")
    assert [text(r["id"]) for r in train] == ["000000000009", "000000000025", "000000000030"]
    assert train[0]["image"] == images["train2017/000000000009.jpg"]
    assert json.loads(text(train[1]["captions"])) == ["caption 0 of 25", "caption 1 of 25", "caption 2 of 25"]
    assert text(train[1]["caption"]) == "caption 0 of 25"
    # 12 (stop sign) -> 11, 0 -> 0, 181 (wood) -> 170, 11 (street sign, unused) -> 255, 255 -> 255, 91 -> 80 (banner)
    np.testing.assert_array_equal(ids_of(train[0]), label(11, 0, 170, 255, 255, 80))
    _, extracted = build(config("coco_stuff", tmp_path / "extracted", tmp_path / "tfds"))
    for split in spec.splits:
        assert records(spec, extracted, split) == records(spec, zipped, split)
    # ALDM's caption files instead of COCO's annotations.
    aldm = write_json(tmp_path / "coco_caption_train.json",
                      {f"{i:012d}": [f"aldm {i}"] for ids in COCO.values() for i in ids})
    _, own = build(config("coco_stuff", tmp_path / "extracted", tmp_path / "tfds", captions=aldm))
    assert text(records(spec, own, "validation")[0]["caption"]) == "aldm 139"


def test_coco_stuff_lut_drops_the_unused_ids():
    lut = classes.coco_stuff_lut()
    used = [v for v in range(182) if v not in classes.COCO_STUFF_UNUSED]
    assert len(used) == 171 and lut[used].tolist() == list(range(171))
    assert all(lut[v] == 255 for v in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90, 255)) and lut[182] == -1


# ----------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------
STEMS = ["a", "b", "c", "d", "e"]


def make_folder(root, class_file=("classes.txt", "# my classes\nsky\n\ntree\n  road  \n"), splits=None, ignore=255):
    members = {}
    for i, stem in enumerate(STEMS):
        ext = "png" if i % 2 else "jpg"
        members[f"images/{stem}.{ext}"] = png_rgb(i) if ext == "png" else jpeg(i)
        members[f"labels/{stem}.png"] = png_ids(label(0, 1, 2, ignore))
    if class_file:
        members[class_file[0]] = class_file[1].encode()
    for split, stems in (splits or {}).items():
        members[f"splits/{split}.txt"] = ("\n".join(stems) + "\n").encode()
    write_tree(root, members)
    return members


def test_folder_classes_flow_to_the_spec_and_split_lists(tmp_path):
    members = make_folder(tmp_path / "mine", splits={"train": ["a", "c", "# comment", "e"], "validation": ["b"]})
    caps = write_json(tmp_path / "captions.json", {s: f"picture {s}" for s in STEMS})
    cfg = config("folder", tmp_path / "mine", tmp_path / "tfds", captions=caps)
    spec = registry.for_config(cfg)
    assert spec.class_names == ("sky", "tree", "road") and spec.ignore_id == 255
    assert len(set(spec.palette)) == 3 and (0, 0, 0) not in spec.palette
    assert spec.palette == registry.for_config(cfg).palette  # fixed, not random
    assert registry.get("folder").class_names == ()  # the template stays unconfigured
    _, builder = build(cfg)
    assert builder.info.metadata["class_names"] == ["sky", "tree", "road"]
    train, val = records(spec, builder, "train"), records(spec, builder, "validation")
    assert [text(r["id"]) for r in train] == ["a", "c", "e"] and [text(r["id"]) for r in val] == ["b"]
    assert val[0]["image"] == members["images/b.png"] and text(val[0]["caption"]) == "picture b"
    np.testing.assert_array_equal(ids_of(train[0]), label(0, 1, 2, 255))


def test_folder_validation_fraction_and_seed(tmp_path):
    make_folder(tmp_path / "mine", class_file=("classes.json", json.dumps(
        {"names": ["sky", "tree", "road"], "colors": [[1, 2, 3], [4, 5, 6], [7, 8, 9]], "ignore_id": 200})), ignore=200)
    # ignore_id 200 in the user's files; records store 255
    cfg = config("folder", tmp_path / "mine", tmp_path / "tfds", missing_captions="empty", validation_fraction=0.4,
                 seed=3)
    spec, builder = build(cfg)
    assert spec.palette == ((1, 2, 3), (4, 5, 6), (7, 8, 9)) and spec.ignore_id == 255
    train, val = records(spec, builder, "train"), records(spec, builder, "validation")
    assert (len(train), len(val)) == (3, 2)
    assert sorted(text(r["id"]) for r in train + val) == STEMS
    c = [r for r in train + val if text(r["id"]) == "c"][0]
    np.testing.assert_array_equal(ids_of(c), label(0, 1, 2, 255))
    again = registry.get("folder").make_builder(cfg)
    assert again.data_dir == builder.data_dir  # same seed and files: the same build
    other = config("folder", tmp_path / "mine", tmp_path / "tfds", missing_captions="empty", validation_fraction=0.2,
                   seed=3)
    assert registry.get("folder").make_builder(other).data_dir != builder.data_dir


def test_folder_label_ids_outside_the_classes(tmp_path):
    make_folder(tmp_path / "mine")
    write_tree(tmp_path / "mine", {"labels/d.png": png_ids(label(0, 7, 3))})
    with pytest.raises(registry.DatasetError) as e:
        build(config("folder", tmp_path / "mine", tmp_path / "tfds", missing_captions="empty"))
    assert "d.png" in str(e.value) and "[3, 7]" in str(e.value) and "3 classes" in str(e.value)


def test_folder_malformed_class_files(tmp_path):
    make_folder(tmp_path / "dup", class_file=("classes.txt", "sky\n# c\ntree\nsky\n"))
    with pytest.raises(registry.DatasetError, match=r"classes\.txt, line 4: class 'sky' is already on line 1"):
        registry.for_config(config("folder", tmp_path / "dup", tmp_path / "tfds"))
    make_folder(tmp_path / "json", class_file=("classes.json", '{"names": ["sky",\n "tree",]}'))
    with pytest.raises(registry.DatasetError, match=r"classes\.json is not valid JSON.*line 2"):
        registry.for_config(config("folder", tmp_path / "json", tmp_path / "tfds"))
    make_folder(tmp_path / "colours", class_file=("classes.json", '{"names": ["sky", "tree"], "colors": [[1, 2, 3]]}'))
    with pytest.raises(registry.DatasetError, match=r"\"colors\" must be a list of 2"):
        registry.for_config(config("folder", tmp_path / "colours", tmp_path / "tfds"))
    make_folder(tmp_path / "none", class_file=None)
    with pytest.raises(registry.DatasetError, match=r"no class file: expected .*classes\.txt"):
        registry.for_config(config("folder", tmp_path / "none", tmp_path / "tfds"))


def test_folder_split_lists_must_name_images(tmp_path):
    make_folder(tmp_path / "mine", splits={"train": ["a", "b", "zz"], "validation": ["c"]})
    with pytest.raises(registry.DatasetError,
                       match=r"1 stems in .*train\.txt have no image and label map \(first: zz\)"):
        build(config("folder", tmp_path / "mine", tmp_path / "tfds", missing_captions="empty"))


def test_coco_stuff_without_caption_annotations(tmp_path):
    images, stuff, _ = coco_members()
    write_tree(tmp_path / "coco", images)
    write_zip(str(tmp_path / "coco" / "stuffthingmaps_trainval2017.zip"), stuff)
    with pytest.raises(registry.DatasetError) as e:
        build(config("coco_stuff", tmp_path / "coco", tmp_path / "tfds"))
    assert "COCO caption annotations" in str(e.value) and "annotations_trainval2017.zip" in str(e.value)
    assert "stuffthingmaps_trainval2017.zip, train2017/, val2017/" in str(e.value)  # what data.path holds
    write_tree(tmp_path / "coco", {"annotations/instances_train2017.json": b"{}"})
    with pytest.raises(registry.DatasetError, match=r"has no annotations/captions_train2017\.json"):
        build(config("coco_stuff", tmp_path / "coco", tmp_path / "tfds"))


def test_the_data_stage_builds_a_folder_dataset_with_preview_and_stats(tmp_path):
    """`--config.data.name=folder --config.data.path=DIR` is all it takes; its classes reach the stats."""
    import subprocess
    import sys

    make_folder(tmp_path / "mine")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "sdsup.train", "--config=configs/scenes.py:smoke", f"--workdir={tmp_path / 'wd'}",
         "--only=data", "--config.data.name=folder", f"--config.data.path={tmp_path / 'mine'}",
         f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.missing_captions=empty",
         "--config.data.image_size=16", "--config.data.validation_fraction=0.4"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((tmp_path / "wd" / "data" / "stats.json").read_text())
    assert set(stats["splits"]) == {"train", "validation"}
    train = stats["splits"]["train"]
    assert set(train["class_pixel_fraction"]) == {"sky", "tree", "road"}
    assert train["images_per_class"] == {c: train["examples_in_stats"] for c in ("sky", "tree", "road")}  # all in every map
    assert (tmp_path / "wd" / "data" / "preview.png").stat().st_size > 100
