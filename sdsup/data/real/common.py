"""What the real-dataset builders share: the record features, the build's name, and checking, mapping and
writing each example.

A builder subclasses `RealBuilder` and says where its files are (`plan`: every split's examples, checked
before tfds writes anything) and how its raw label values map to class ids (`label_map`). Writing then
reads each image and label map once, decodes both (a file that does not decode stops the build, named),
maps the label map through the dataset's lookup table and stores it as a PNG next to the untouched
image bytes. Decoding and PNG encoding run on a few threads (PIL releases the GIL while it works), files
are read in order on the calling thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sdsup.data.real import captions as captions_lib
from sdsup.data.real import classes as class_tables
from sdsup.data.real import files
from sdsup.data.registry import DatasetError

SPLITS = ("train", "validation")
LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")  # one channel of integers


def features() -> tfds.features.FeaturesDict:
    """Every real dataset's record (the `sdsup.data.real` docstring describes each field)."""
    encoded = dict(shape=(), dtype=np.object_)  # raw bytes, stored and returned as they are
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(**encoded),
        "label": tfds.features.Tensor(**encoded),
        "caption": tfds.features.Text(),
        "captions": tfds.features.Text(),
        "id": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64),
    })


def config_name(fingerprint: Mapping) -> str:
    """The build's tfds config name: a hash of its sources and options, so other files or options build a
    new dataset next to the old one and never reuse it."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return "src_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class RealConfig(tfds.core.BuilderConfig):
    """Where the files are, the caption files and the options; named by `config_name` of all of them."""

    def __init__(self, *, dataset: str, path: str, caption_files: Tuple[str, ...] = (),
                 missing_captions: str = "error", fingerprint: Optional[Mapping] = None, **options):
        # Caption files count by content (in order), not by where they lie.
        digests = [files.file_digest(p) for p in caption_files]
        name = config_name(dict(fingerprint or {}, dataset=dataset, path=path, missing_captions=missing_captions,
                                captions=digests))
        super().__init__(name=name, description=f"{dataset} from {path}")
        self.dataset = dataset
        self.path = path
        self.caption_files = tuple(caption_files)
        self.missing_captions = missing_captions
        self.options = dict(options)


@dataclasses.dataclass(frozen=True)
class Example:
    stem: str
    image: files.Ref
    label: files.Ref
    captions: Tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class LabelMap:
    """Raw label values -> class ids: `lut[raw]` (int16; 255 ignore, -1 a value the dataset never writes)."""

    lut: np.ndarray
    valid: str  # the values the dataset writes, as error messages name them

    def apply(self, raw: np.ndarray, where) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            out_of_range = (raw < 0) | (raw >= len(self.lut))
            if out_of_range.any():
                self._fail(raw[out_of_range], where)
            raw = raw.astype(np.intp)
        ids = self.lut[raw]
        bad = ids < 0
        if bad.any():
            self._fail(raw[bad], where)
        return ids.astype(np.uint8)

    def _fail(self, values: np.ndarray, where):
        bad = np.unique(values).tolist()
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise DatasetError(f"label map {where} has ids {bad[:10]}{more} outside {self.valid}")


class RealBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset read from the user's files (subclasses: `plan`, `label_map`, `class_info`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = []  # made from the data config by each module's make_builder, named by their sources
    DESCRIPTION = ""
    # Threads decoding and encoding while writing.
    num_workers = min(8, os.cpu_count() or 1)

    def class_info(self) -> Tuple[Sequence[str], Sequence[Sequence[int]]]:
        """(class names, palette)."""
        raise NotImplementedError

    def label_map(self) -> LabelMap:
        raise NotImplementedError

    def plan(self) -> Dict[str, List[Example]]:
        """Every split's examples in stem order, sources checked; DatasetError naming what is wrong."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        names, palette = self.class_info()
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION,
            features=features(),
            metadata=tfds.core.MetadataDict(
                class_names=list(names),
                palette=[list(c) for c in palette],
                ignore_id=class_tables.IGNORE_ID,
                source=cfg.path,
                caption_files=list(cfg.caption_files),
                missing_captions=cfg.missing_captions,
                options=cfg.options,
            ),
            # Records stay in stem order, so `index` is the position in the split; training shuffles anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the files are the user's
        plan = self.plan()  # raises before anything is written
        return {split: self._generate_examples(examples) for split, examples in plan.items()}

    def _generate_examples(self, examples: Sequence[Example]):
        yield from encode_all(examples, self.label_map(), self.num_workers)


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------
def make(builder_class, data_config, *, dataset: str, expects: str, fingerprint: Optional[Mapping] = None,
         caption_files=None, **options):
    """`builder_class` for `data_config`: data.path, data.captions, data.missing_captions, data.data_dir."""
    path = source_path(data_config, dataset, expects)
    if caption_files is None:
        caption_files = captions_lib.caption_paths(data_config)
    config = RealConfig(dataset=dataset, path=path, caption_files=caption_files,
                        missing_captions=captions_lib.missing_mode(data_config), fingerprint=fingerprint, **options)
    return builder_class(config=config, data_dir=data_dir(data_config))


def source_path(data_config, dataset: str, expects: str) -> str:
    path = data_config.get("path") if hasattr(data_config, "get") else None
    if not path:
        raise DatasetError(f"dataset {dataset} is built from your files: set data.path to the folder holding "
                           f"{expects}")
    return os.path.abspath(os.path.expanduser(str(path)))


def data_dir(data_config):
    value = data_config.get("data_dir") if hasattr(data_config, "get") else None
    return os.path.expanduser(value) if value else None


# ----------------------------------------------------------------------------
# Planning: files found, paired by stem, captioned.
# ----------------------------------------------------------------------------
def index_files(tree: files.Tree, sub: str, suffixes: Sequence[str], *, dataset: str) -> Dict[str, files.Ref]:
    """{stem: file} of the files under `sub` whose names end with one of `suffixes` (any case); the stem is
    the name without that suffix. DatasetError when two files share a stem."""
    found: Dict[str, files.Ref] = {}
    for rel in tree.files(sub):
        name = rel.rsplit("/", 1)[-1]
        suffix = next((s for s in suffixes if name.lower().endswith(s.lower())), None)
        if suffix is None:
            continue
        stem = name[: len(name) - len(suffix)]
        ref = tree.ref(f"{sub}/{rel}" if sub else rel)
        if stem in found:
            raise DatasetError(f"dataset {dataset}: two files have the stem {stem!r}, which pairs images, label "
                               f"maps and captions: {found[stem]} and {ref}; rename or remove one")
        found[stem] = ref
    return found


def pair(images: Mapping[str, files.Ref], labels: Mapping[str, files.Ref], *, dataset: str, split: str,
         where: str) -> List[Tuple[str, files.Ref, files.Ref]]:
    """[(stem, image, label map)] in stem order; DatasetError for images without a label map, label maps
    without an image, or no images at all."""
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"{len(no_label)} images have no label map (first: {', '.join(no_label[:5])})")
        if no_image:
            parts.append(f"{len(no_image)} label maps have no image (first: {', '.join(no_image[:5])})")
        raise DatasetError(f"dataset {dataset}, split {split}: " + " and ".join(parts) + f" in {where}")
    if not images:
        raise DatasetError(f"dataset {dataset}, split {split}: no images found in {where}")
    return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


def examples(pairs: Mapping[str, Sequence[Tuple[str, files.Ref, files.Ref]]], table: Mapping, *, mode: str,
             dataset: str, source: str) -> Dict[str, List[Example]]:
    """Each split's examples, with the captions `table` ({stem: captions}) gives them (see `captions.attach`)."""
    stems = {split: [p[0] for p in split_pairs] for split, split_pairs in pairs.items()}
    captioned = captions_lib.attach(stems, table, mode=mode, dataset=dataset, source=source)
    return {split: [Example(stem, image, label, caps)
                     for (stem, image, label), caps in zip(pairs[split], captioned[split])]
            for split in pairs}


def caption_table(config: RealConfig) -> Tuple[Dict, str]:
    """({stem: captions}, how messages name their source) from the config's caption files."""
    if not config.caption_files:
        return {}, "data.captions (not set)"
    return (captions_lib.read_caption_files(config.caption_files),
            "data.captions (" + ", ".join(config.caption_files) + ")")


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------
def encode_all(examples: Sequence[Example], label_map: LabelMap, workers: int) -> Iterator[Tuple[int, dict]]:
    """(index, record) of each example, in order; the key is the index (the split's order, as tfds keeps
    it with shuffling disabled)."""
    window = 4 * max(1, workers)  # examples in flight: bounds memory, keeps every thread busy
    with files.Reader() as reader, concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending = collections.deque()
        for index, ex in enumerate(examples):
            pending.append(pool.submit(encode, ex, index, reader.read(ex.image), reader.read(ex.label), label_map))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def encode(ex: Example, index: int, image: bytes, label: bytes, label_map: LabelMap) -> Tuple[int, dict]:
    width, height = check_image(image, ex.image)
    raw = read_label(label, ex.label)
    if raw.shape != (height, width):
        raise DatasetError(f"label map {ex.label} is {raw.shape[1]}x{raw.shape[0]} but its image {ex.image} is "
                           f"{width}x{height}")
    ids = label_map.apply(raw, ex.label)
    return index, {
        "image": image,
        "label": png(ids),
        "caption": ex.captions[0],
        "captions": json.dumps(list(ex.captions), ensure_ascii=False),
        "id": ex.stem,
        "index": index,
    }


def check_image(data: bytes, where) -> Tuple[int, int]:
    """(width, height) of an encoded image after decoding all of it; DatasetError naming `where` when it is
    not a JPEG or PNG or does not decode (truncated, corrupt)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG"):
                raise DatasetError(f"image {where} is {img.format or 'an unknown format'}; images must be JPEG or PNG")
            size = img.size
            if img.format == "JPEG":
                # Decoding at 1/8 scale still reads every byte of the entropy-coded data, so a truncated
                # or corrupt file fails here, at a fraction of the cost of a full decode.
                img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except DatasetError:
        raise
    except Exception as e:  # PIL reports bad files as OSError, SyntaxError, ValueError, ...
        raise DatasetError(f"image {where} does not decode: {type(e).__name__}: {e}") from None
    return size


def read_label(data: bytes, where) -> np.ndarray:
    """A label PNG's raw values [H, W]; DatasetError naming `where` when it is not a one-channel PNG that
    decodes."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise DatasetError(f"label map {where} is {img.format or 'an unknown format'}; label maps must be PNG")
            if img.mode not in LABEL_MODES:
                raise DatasetError(f"label map {where} has mode {img.mode} ({len(img.getbands())} channels); label "
                                   f"maps must be one-channel PNGs of class ids, not colour pictures")
            img.load()
            ids = np.asarray(img)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"label map {where} does not decode: {type(e).__name__}: {e}") from None
    return ids.astype(np.uint8) if ids.dtype == bool else ids


def png(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
