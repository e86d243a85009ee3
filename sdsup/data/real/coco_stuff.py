"""COCO-Stuff (164K, 171 classes) with COCO's captions as a tfds dataset, built from your copy.

data.path holds, each as downloaded or extracted into data.path:

  train2017.zip / train2017/*.jpg            COCO 2017 train images (stem = 12-digit id; 118,287)
  val2017.zip / val2017/*.jpg                COCO 2017 val images (5,000)
  stuffthingmaps_trainval2017.zip /          COCO-Stuff label maps, train2017/*.png and val2017/*.png
    stuffthingmaps_trainval2017/{train2017,val2017}/*.png
  annotations_trainval2017.zip /             COCO's caption annotations (only the captions files are read)
    annotations/captions_{train,val}2017.json

Splits: train2017 -> "train", val2017 -> "validation". Label maps hold 0..181 and 255; the 11 COCO ids
without annotations become ignore, the other 171 become 0..170 in order (`classes.coco_stuff_lut`).

Captions: every caption COCO has for the image (about 5), all in the record's `captions` (the input
pipeline draws one per example and epoch; `caption` is the first). With `data.captions` set, those
files ({stem: [captions]}, e.g. ALDM's `coco_caption_train.json`) are read instead and the
annotations are not needed. `data.missing_captions` as in `captions`.

Classes: `classes.COCO_STUFF_CLASSES` (COCO-Stuff's names); palette and caption phrases: ALDM's.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from sdsup.data.real import captions, classes, common, files
from sdsup.data.registry import DatasetError

NAME = "coco_stuff"
LABELS_ZIP = "stuffthingmaps_trainval2017.zip"
ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
_SPLITS = (("train", "train2017"), ("validation", "val2017"))


class SdsupCocoStuff(common.RealBuilder):
    """COCO-Stuff's 171 classes: image, label map, COCO's captions."""

    DESCRIPTION = "COCO-Stuff 164K (stuffthingmaps), 171 classes, with COCO 2017 captions, from the user's copy."

    def class_info(self):
        return classes.COCO_STUFF_CLASSES, classes.COCO_STUFF_PALETTE

    def label_map(self) -> common.LabelMap:
        return common.LabelMap(classes.coco_stuff_lut(), "COCO-Stuff's label values (0..181, 255)")

    def plan(self):
        cfg = self.builder_config
        labels_tree = files.locate(cfg.path, dataset=NAME, what="COCO-Stuff label maps (stuffthingmaps)",
                                   zip_name=LABELS_ZIP, required=[sub for _, sub in _SPLITS],
                                   folders=("stuffthingmaps_trainval2017",),
                                   zip_prefixes=("", "stuffthingmaps_trainval2017/"))
        pairs = {}
        for split, sub in _SPLITS:
            images_tree = files.locate(cfg.path, dataset=NAME, what=f"COCO {sub} images", zip_name=f"{sub}.zip",
                                       required=[sub])
            images = common.index_files(images_tree, sub, (".jpg",), dataset=NAME)
            labels = common.index_files(labels_tree, sub, (".png",), dataset=NAME)
            pairs[split] = common.pair(images, labels, dataset=NAME, split=split,
                                       where=f"{images_tree} {sub}/ and {labels_tree} {sub}/")
        if cfg.caption_files:
            table, source = common.caption_table(cfg)
        else:
            table, source = self._coco_captions()
        return common.examples(pairs, table, mode=cfg.missing_captions, dataset=NAME, source=source)

    def _coco_captions(self):
        """({stem: captions}, source) from COCO's caption annotations of both splits."""
        cfg = self.builder_config
        tree = files.locate(cfg.path, dataset=NAME, what="COCO caption annotations", zip_name=ANNOTATIONS_ZIP,
                            required=["annotations"])
        table, names = {}, []
        with files.Reader() as reader:
            for _, sub in _SPLITS:
                rel = f"annotations/captions_{sub}.json"
                if not tree.has_file(rel):
                    raise DatasetError(f"dataset {NAME}: {tree} has no {rel} (COCO's captions); extract "
                                       f"{ANNOTATIONS_ZIP} into data.path, or set data.captions")
                ref = tree.ref(rel)
                table.update(captions.read_coco_captions(reader.read(ref), ref))
                names.append(str(ref))
        return table, "COCO's caption annotations (" + ", ".join(names) + ")"


def make_builder(data_config) -> tfds.core.DatasetBuilder:
    """The builder for `data_config` (data.path, data.captions, data.missing_captions, data.data_dir)."""
    return common.make(SdsupCocoStuff, data_config, dataset=NAME,
                       expects=f"train2017.zip, val2017.zip, {LABELS_ZIP} and {ANNOTATIONS_ZIP} (or them extracted)")
