"""Cityscapes (fine annotations, 19 classes) as a tfds dataset, built from your copy.

data.path holds `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` as downloaded, or them
extracted into data.path (data.path/leftImg8bit/, data.path/gtFine/), with

  leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
  gtFine/<split>/<city>/<stem>_gtFine_labelIds.png

paired by stem (`frankfurt_000000_000576`, the record's id). Splits: train (2,975) and val, written as
"validation" (500); the test split (no public labels) is not read. Label maps: the labelIds PNGs,
mapped to the 19 trainIds of cityscapesScripts' `labels.py` (road 7 -> 0 ... bicycle 33 -> 18); every
other labelId, and 255 (license plate's -1 as a byte), is ignored (255). Values 34..254 are not labelIds
and stop the build.

Captions: `data.captions`, e.g. ALDM's `cityscapes_caption_train.json,cityscapes_caption_val.json`
({"frankfurt_000000_000576": "a street filled with ..."}); `data.missing_captions` as in `captions`.

Classes and palette: `classes.CITYSCAPES_CLASSES` / `CITYSCAPES_PALETTE` (the benchmark's colours).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from sdsup.data.real import classes, common, files

NAME = "cityscapes"
IMAGES_ZIP = "leftImg8bit_trainvaltest.zip"
LABELS_ZIP = "gtFine_trainvaltest.zip"
_SPLITS = (("train", "train"), ("validation", "val"))
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


class SdsupCityscapes(common.RealBuilder):
    """Cityscapes' 19 classes: image, label map, captions."""

    DESCRIPTION = "Cityscapes fine annotations (gtFine), 19 train classes, from the user's copy."

    def class_info(self):
        return classes.CITYSCAPES_CLASSES, classes.CITYSCAPES_PALETTE

    def label_map(self) -> common.LabelMap:
        return common.LabelMap(classes.cityscapes_lut(), "Cityscapes' labelIds (0..33, 255)")

    def plan(self):
        cfg = self.builder_config
        images_tree = files.locate(cfg.path, dataset=NAME, what="images (leftImg8bit)", zip_name=IMAGES_ZIP,
                                   required=[f"leftImg8bit/{sub}" for _, sub in _SPLITS])
        labels_tree = files.locate(cfg.path, dataset=NAME, what="fine label maps (gtFine)", zip_name=LABELS_ZIP,
                                   required=[f"gtFine/{sub}" for _, sub in _SPLITS])
        pairs = {}
        for split, sub in _SPLITS:
            images = common.index_files(images_tree, f"leftImg8bit/{sub}", (_IMAGE_SUFFIX,), dataset=NAME)
            labels = common.index_files(labels_tree, f"gtFine/{sub}", (_LABEL_SUFFIX,), dataset=NAME)
            pairs[split] = common.pair(images, labels, dataset=NAME, split=split,
                                       where=f"{images_tree} leftImg8bit/{sub} and {labels_tree} gtFine/{sub}")
        table, source = common.caption_table(cfg)
        return common.examples(pairs, table, mode=cfg.missing_captions, dataset=NAME, source=source)


def make_builder(data_config) -> tfds.core.DatasetBuilder:
    """The builder for `data_config` (data.path, data.captions, data.missing_captions, data.data_dir)."""
    return common.make(SdsupCityscapes, data_config, dataset=NAME,
                       expects=f"{IMAGES_ZIP} and {LABELS_ZIP}, or their extracted folders leftImg8bit/ and gtFine/")
