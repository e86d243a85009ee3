"""Your own dataset as a tfds dataset: a folder of images, label maps, a class file and captions.

data.path (DIR) holds

  images/               JPEG or PNG images (.jpg, .jpeg, .png, any case; subfolders are read too)
  labels/               one PNG per image with the same stem: one channel of class ids (0..N-1, and
                        the class file's ignore id for unlabelled pixels; anything else stops the build,
                        naming the file and the ids), the same size as its image
  classes.txt or classes.json
                        the classes (`classfile`): names in id order, optional colours and ignore id
  splits/train.txt and splits/validation.txt (optional)
                        stems, one per line (blank lines and `#` comments skipped); images in neither
                        list are left out. Without them `data.validation_fraction` (default 0.1) of the
                        images, drawn with `data.seed` (default 0), form the validation split.

Captions: `data.captions` ({stem: caption} or {stem: [captions]}, e.g. from `python -m sdsup.caption`);
`data.missing_captions` as in `captions`.

The dataset's spec (class names, palette, ignore id 255) comes from the class file through the
registry's `configure` hook, so every consumer sees your classes. The build's name covers the class
file, the split lists or fraction and seed, and every image and label file's name, size and
modification time: editing the folder builds a new dataset rather than reusing the old one.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from sdsup.data.real import classfile, classes, common, files
from sdsup.data.registry import DatasetError

NAME = "folder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_VALIDATION_FRACTION = 0.1


class SdsupFolder(common.RealBuilder):
    """The user's classes: image, label map, captions."""

    DESCRIPTION = "A user's folder of images, label maps (class ids), a class file and captions."

    def class_info(self):
        cf = self.builder_config.options
        return cf["class_names"], cf["palette"]

    def label_map(self) -> common.LabelMap:
        opts = self.builder_config.options
        num_classes, ignore_id = len(opts["class_names"]), opts["source_ignore_id"]
        lut = np.full(max(256, ignore_id + 1), -1, np.int16)
        lut[:num_classes] = np.arange(num_classes)
        lut[ignore_id] = classes.IGNORE_ID
        return common.LabelMap(lut, f"the {num_classes} classes of {opts['class_file']} (ids 0..{num_classes - 1}, "
                                    f"ignore {ignore_id})")

    def plan(self):
        cfg = self.builder_config
        tree = _tree(cfg.path)
        images = common.index_files(tree, "images", IMAGE_SUFFIXES, dataset=NAME)
        labels = common.index_files(tree, "labels", (".png",), dataset=NAME)
        everything = common.pair(images, labels, dataset=NAME, split="(all)", where=f"{cfg.path} (images/, labels/)")
        by_stem = {stem: (stem, image, label) for stem, image, label in everything}
        opts = cfg.options
        if opts["split_files"]:
            split_stems = _read_split_lists(cfg.path, sorted(by_stem))
        else:
            split_stems = _draw_splits(sorted(by_stem), opts["validation_fraction"], opts["seed"])
        pairs = {split: [by_stem[s] for s in sorted(stems)] for split, stems in split_stems.items()}
        table, source = common.caption_table(cfg)
        return common.examples(pairs, table, mode=cfg.missing_captions, dataset=NAME, source=source)


def _tree(root: str) -> files.Tree:
    missing = [d for d in ("images", "labels") if not os.path.isdir(os.path.join(root, d))]
    if missing:
        raise DatasetError(f"dataset {NAME}: data.path={root} has no {' or '.join(d + '/' for d in missing)}; "
                           f"expected images/ (jpg/png), labels/ (PNG class ids, same stems) and classes.txt or "
                           f"classes.json; it holds {files.listing(root)}")
    return files.Tree.folder(root)


def _split_files(root: str) -> List[str]:
    """The split lists, both or none; DatasetError when only one exists."""
    paths = [os.path.join(root, "splits", f"{split}.txt") for split in common.SPLITS]
    present = [p for p in paths if os.path.isfile(p)]
    if present and len(present) != len(paths):
        missing = sorted(set(paths) - set(present))
        raise DatasetError(f"dataset {NAME}: {present[0]} exists but {missing[0]} does not; give both split lists "
                           f"or neither (then data.validation_fraction holds out validation images)")
    return present


def _read_split_lists(root: str, stems: Sequence[str]) -> Dict[str, List[str]]:
    known, seen, out = set(stems), {}, {}
    for split in common.SPLITS:
        path = os.path.join(root, "splits", f"{split}.txt")
        listed = []
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for number, stem in classfile.listed_lines(text):
            if stem in seen:
                raise DatasetError(f"dataset {NAME}: {path}, line {number}: {stem!r} is already listed "
                                   f"({seen[stem]})")
            seen[stem] = f"{os.path.basename(path)} line {number}"
            listed.append(stem)
        unknown = [s for s in listed if s not in known]
        if unknown:
            raise DatasetError(f"dataset {NAME}: {len(unknown)} stems in {path} have no image and label map "
                               f"(first: {', '.join(unknown[:5])})")
        if not listed:
            raise DatasetError(f"dataset {NAME}: {path} lists no images")
        out[split] = listed
    left_out = len(known) - len(seen)
    if left_out:
        logging.warning("dataset folder: %d images are in neither split list and are left out", left_out)
    return out


def _draw_splits(stems: Sequence[str], fraction: float, seed: int) -> Dict[str, List[str]]:
    num_validation = max(1, int(round(fraction * len(stems))))
    if num_validation >= len(stems):
        raise DatasetError(f"dataset {NAME}: {len(stems)} images are too few to hold out "
                           f"data.validation_fraction={fraction} of them and still train on some")
    order = np.random.default_rng(seed).permutation(len(stems))
    held_out = {stems[i] for i in order[:num_validation]}
    return {"train": [s for s in stems if s not in held_out], "validation": sorted(held_out)}


def _listing_fingerprint(root: str) -> str:
    """A digest of every image's and label map's name, size and modification time."""
    entries = []
    for sub in ("images", "labels"):
        base = os.path.join(root, sub)
        for folder, dirs, names in os.walk(base):
            dirs.sort()
            for name in sorted(names):
                st = os.stat(os.path.join(folder, name))
                entries.append(f"{os.path.relpath(os.path.join(folder, name), root)}\t{st.st_size}\t{st.st_mtime_ns}")
    return files.digest("\n".join(entries).encode("utf-8"))


def make_builder(data_config) -> tfds.core.DatasetBuilder:
    """The builder for `data_config` (data.path, data.captions, data.missing_captions, data.validation_fraction,
    data.seed, data.data_dir)."""
    root = common.source_path(data_config, NAME, "images/, labels/ and classes.txt or classes.json")
    try:
        cf = classfile.read(root)
    except classfile.ClassFileError as e:
        raise DatasetError(str(e)) from None
    split_files = _split_files(root)
    fraction = data_config.get("validation_fraction", DEFAULT_VALIDATION_FRACTION)
    fraction = DEFAULT_VALIDATION_FRACTION if fraction is None else fraction
    if not split_files and not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise DatasetError(f"data.validation_fraction must be a number between 0 and 1 (exclusive), got {fraction!r}")
    seed = data_config.get("seed", 0)
    seed = 0 if seed is None else int(seed)
    fingerprint = {
        "classes": cf.sha256,
        "files": _listing_fingerprint(root),
        # With split lists the fraction and seed play no part.
        "splits": [files.file_digest(p) for p in split_files] if split_files else [float(fraction), seed],
    }
    return common.make(SdsupFolder, data_config, dataset=NAME, expects="images/, labels/ and a class file",
                       fingerprint=fingerprint, class_names=list(cf.names), palette=[list(c) for c in cf.palette],
                       source_ignore_id=cf.ignore_id, class_file=cf.path, split_files=list(split_files),
                       validation_fraction=None if split_files else float(fraction), seed=None if split_files else seed)
