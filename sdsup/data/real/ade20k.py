"""ADE20K (the SceneParsing benchmark, ADEChallengeData2016) as a tfds dataset, built from your copy.

data.path holds `ADEChallengeData2016.zip` as downloaded, or it extracted (data.path/ADEChallengeData2016/,
or data.path itself), with

  images/training/ADE_train_00000001.jpg ...       annotations/training/ADE_train_00000001.png ...
  images/validation/ADE_val_00000001.jpg ...       annotations/validation/ADE_val_00000001.png ...

paired by stem (20,210 train, 2,000 validation). The annotation PNGs hold 0 ("other", not one of the
150 classes) and 1..150; records hold 0 -> 255 (ignore) and 1..150 -> 0..149. tfds' own
`scene_parse150` is not used: it reads the instance masks.

Captions: `data.captions`, e.g. ALDM's `ade20k_caption_train.json,ade20k_caption_val.json`
({"ADE_train_00000001": "a large building ..."}); `data.missing_captions` as in `captions`.

Classes and palette: `classes.ADE20K_CLASSES` / `ADE20K_PALETTE` (ControlNet's segmentation palette).
That palette gives road (6) and skyscraper (48) the same colour (140, 140, 140); reading a colour
layout back to ids, the lower id wins (`classes.colour_table`), so that colour reads as road.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from sdsup.data.real import classes, common, files

NAME = "ade20k"
ZIP = "ADEChallengeData2016.zip"
_SPLITS = (("train", "training"), ("validation", "validation"))


class SdsupAde20k(common.RealBuilder):
    """ADE20K's 150 classes: image, label map, captions."""

    DESCRIPTION = "ADE20K SceneParsing (ADEChallengeData2016), 150 classes, from the user's copy."

    def class_info(self):
        return classes.ADE20K_CLASSES, classes.ADE20K_PALETTE

    def label_map(self) -> common.LabelMap:
        return common.LabelMap(classes.ade20k_lut(), "ADE20K's annotation values (0 = other, 1..150 = the classes)")

    def plan(self):
        cfg = self.builder_config
        required = [f"{kind}/{sub}" for kind in ("images", "annotations") for _, sub in _SPLITS]
        tree = files.locate(cfg.path, dataset=NAME, what="ADEChallengeData2016 images and annotations", zip_name=ZIP,
                            required=required, folders=("ADEChallengeData2016", "."),
                            zip_prefixes=("ADEChallengeData2016/", ""))
        pairs = {}
        for split, sub in _SPLITS:
            images = common.index_files(tree, f"images/{sub}", (".jpg",), dataset=NAME)
            labels = common.index_files(tree, f"annotations/{sub}", (".png",), dataset=NAME)
            pairs[split] = common.pair(images, labels, dataset=NAME, split=split,
                                       where=f"{tree} (images/{sub}, annotations/{sub})")
        table, source = common.caption_table(cfg)
        return common.examples(pairs, table, mode=cfg.missing_captions, dataset=NAME, source=source)


def make_builder(data_config) -> tfds.core.DatasetBuilder:
    """The builder for `data_config` (data.path, data.captions, data.missing_captions, data.data_dir)."""
    return common.make(SdsupAde20k, data_config, dataset=NAME,
                       expects=f"{ZIP} or its extracted folder ADEChallengeData2016/")
