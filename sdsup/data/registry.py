"""Dataset specs: everything the rest of sdsup needs to know about a dataset.

The trainer, evaluation and visualisation read class names, palette, ignore id
and captions only through a `DatasetSpec`, so a real dataset (ADE20K,
Cityscapes, COCO-Stuff) plugs in by registering a spec with its tfds builder;
nothing else changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Optional, Tuple

import filelock
import numpy as np

from sdsup.data import scenes
from sdsup.data.real import classes as _real_classes
from sdsup.data.real import classfile as _classfile
from sdsup.errors import SdsupError


class DatasetError(SdsupError):
    """A dataset that is missing, corrupt or misconfigured."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_names: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]  # label colours, one per class
    ignore_id: int
    # Where captions come from: "field:<feature>" reads a feature of each record.
    caption_source: str
    # data_config (a ConfigDict or dict with the `data.*` fields) -> tfds builder.
    make_builder: Callable
    # Whether `download_and_prepare` can run offline without user files.
    builds_offline: bool
    default_tokenizer: str  # "scenes_words" | "clip"
    splits: Tuple[str, ...] = ("train", "validation", "test")
    # How captions name each class (e.g. the scenes say "lake" for water);
    # empty means the class names themselves. Class-embedding layouts use it.
    class_phrases: Tuple[str, ...] = ()

    # Hooks: what generic code asks of a dataset and only the dataset knows. None = not offered.
    # The caption of a horizontally flipped image (scenes: "left" <-> "right"); None keeps captions as
    # they are, right for captions that never name sides.
    flip_caption: Optional[Callable[[str], str]] = None
    # A record -> the (class name, relation, class name) facts its caption states, with relation one of
    # "left of", "right of", "above", "below"; the layout evaluation scores relation accuracy with it.
    caption_relations: Optional[Callable[[dict], list]] = None
    # A record -> every fact its caption states (`sdsup.data.facts.Fact`: objects, counts, positions,
    # relations, colours), for the faithfulness evaluation; None: the classes the caption names.
    caption_facts: Optional[Callable[[dict], list]] = None
    # The classes that are countable objects (not stuff): the faithfulness evaluation's coherence and
    # "unnamed things" read them; empty: not measured.
    thing_classes: Tuple[str, ...] = ()
    # A record -> counts to sum over a split's records, extra statistics for the data stage's stats.json.
    record_stats: Optional[Callable[[dict], dict]] = None
    # Prompts outside the training captions, for the layout report's picture of novel prompts.
    novel_prompts: Tuple[str, ...] = ()
    # data_config -> the concrete spec, for datasets whose classes come from the user's files (the
    # `folder` dataset reads its class file); None: this spec is the dataset's whatever the config.
    configure: Optional[Callable[[Any], "DatasetSpec"]] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def phrases(self) -> Tuple[str, ...]:
        return self.class_phrases or self.class_names

    @property
    def palette_array(self) -> np.ndarray:
        return np.asarray(self.palette, np.uint8)

    @property
    def caption_field(self) -> str:
        kind, _, field = self.caption_source.partition(":")
        if kind != "field" or not field:
            raise DatasetError(f"dataset {self.name}: unsupported caption_source {self.caption_source!r}")
        return field


_REGISTRY: dict = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    if spec.class_phrases and len(spec.class_phrases) != spec.num_classes:
        raise ValueError(f"dataset {spec.name!r}: {len(spec.class_phrases)} class phrases for {spec.num_classes} classes")
    if len(spec.palette) != spec.num_classes:
        raise ValueError(f"dataset {spec.name!r}: {len(spec.palette)} palette colours for {spec.num_classes} classes")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; registered: {sorted(_REGISTRY)}") from None


def names() -> list:
    return sorted(_REGISTRY)


def for_config(data_config) -> DatasetSpec:
    """The spec of the dataset `data_config` (a config's `data` section) names, with its classes resolved."""
    spec = get(data_config.name)
    return spec.configure(data_config) if spec.configure is not None else spec


def _scenes_builder(data_config):
    from sdsup.data import scenes_builder  # deferred: tensorflow_datasets is heavy; only building needs it

    config = scenes_builder.ScenesConfig(
        image_size=int(data_config.image_size),
        seed=int(data_config.seed),
        num_train=int(data_config.num_train),
        num_validation=int(data_config.num_validation),
        num_test=int(data_config.num_test),
    )
    # tfds wants the registered configs by name, not as an equal new object.
    known = {c.name for c in scenes_builder.SdsupScenes.BUILDER_CONFIGS}
    return scenes_builder.SdsupScenes(config=config.name if config.name in known else config,
                                      data_dir=_data_dir(data_config))


def _data_dir(data_config) -> Optional[str]:
    data_dir = data_config.get("data_dir") if hasattr(data_config, "get") else None
    return os.path.expanduser(data_dir) if data_dir else None


SCENES = register(
    DatasetSpec(
        name="scenes",
        class_names=scenes.CLASS_NAMES,
        palette=tuple(tuple(int(v) for v in c) for c in scenes.PALETTE),
        ignore_id=scenes.IGNORE_ID,
        caption_source="field:caption",
        make_builder=_scenes_builder,
        builds_offline=True,
        default_tokenizer="scenes_words",
        class_phrases=tuple({"mountain": "mountains", "water": "lake"}.get(n, n) for n in scenes.CLASS_NAMES),
        flip_caption=scenes.swap_left_right,
        caption_relations=scenes.caption_relations,
        caption_facts=scenes.caption_facts,
        thing_classes=scenes.THING_CLASSES,
        record_stats=scenes.record_stats,
        novel_prompts=scenes.NOVEL_PROMPTS,
    )
)


# ----------------------------------------------------------------------------
# Building and opening.
# ----------------------------------------------------------------------------
def prepare(spec: DatasetSpec, data_config):
    """The dataset's builder, built first if it can be and is not yet.

    Raises DatasetError, naming the directory, when the data is missing and
    cannot be built here, or is present but incomplete or corrupt.
    """
    try:
        builder = spec.make_builder(data_config)
    except DatasetError:
        raise
    except Exception as e:  # tfds reports a bad dataset_info.json this way.
        raise DatasetError(f"dataset {spec.name}: cannot open its directory "
                           f"({_data_dir(data_config) or 'tfds default'}): {type(e).__name__}: {e}") from e
    if not builder.is_prepared():
        if not spec.builds_offline:
            raise DatasetError(
                f"dataset {spec.name} is not prepared under {builder.data_dir} and needs your files: "
                f"see its builder's manual_dir instructions")
        with _build_lock(builder.data_dir):
            # Another run sharing this data_dir may have built it while this one waited.
            builder = spec.make_builder(data_config)
            if not builder.is_prepared():
                builder.download_and_prepare(file_format="array_record")
    verify(spec, builder)
    return builder


@contextlib.contextmanager
def _build_lock(version_dir: str):
    """Serialises builds of one dataset version across processes on this filesystem: two runs sharing a
    data_dir that build the same version at once would otherwise replace each other's files mid-read."""
    if "://" in version_dir:  # object stores (gs://) have no file locks; build there from one process
        yield
        return
    parent = os.path.dirname(os.path.normpath(version_dir))
    os.makedirs(parent, exist_ok=True)
    with filelock.FileLock(os.path.join(parent, f".{os.path.basename(os.path.normpath(version_dir))}.build.lock")):
        yield


def verify(spec: DatasetSpec, builder) -> None:
    """Checks that each split's records exist, count right and decode."""
    where = builder.data_dir
    for split in spec.splits:
        try:
            expected = builder.info.splits[split].num_examples
            source = builder.as_data_source(split)
            if len(source) != expected:
                raise DatasetError(f"split {split} has {len(source)} records, dataset_info says {expected}")
            if expected:
                source[0], source[expected - 1]  # decodes; a truncated file fails here
        except DatasetError as e:
            raise DatasetError(f"dataset {spec.name} at {where} is incomplete or corrupt: {e}; "
                               f"delete {where} to rebuild it") from None
        except Exception as e:
            raise DatasetError(f"dataset {spec.name} at {where} is incomplete or corrupt "
                               f"(split {split}: {type(e).__name__}: {e}); delete {where} to rebuild it") from None


def data_source(spec: DatasetSpec, builder, split: str):
    """Random-access source of decoded records for grain; a record that cannot be read raises a DatasetError
    naming the split and the index (`CheckedSource`)."""
    if split not in spec.splits:
        raise DatasetError(f"dataset {spec.name} has no split {split!r}; splits: {spec.splits}")
    return CheckedSource(builder.as_data_source(split), spec.name, split, str(builder.data_dir))


class CheckedSource:
    """A split's records, read through `source`, with every read failure as a DatasetError naming the split and
    the record's index.

    The policy for damaged records is to stop, never to skip: array_record checks a hash per chunk, so bytes
    damaged inside a built dataset fail the read of the records in that chunk (a RuntimeError from riegeli,
    or a decoding error), and training or evaluation on silently fewer examples would change results without
    a trace. Grain re-raises the error from its reader threads and worker processes, so nothing waits on a
    record that never comes. `dataset.verify` only reads each split's first and last record.
    """

    def __init__(self, source, dataset: str, split: str, where: str):
        self.source, self.dataset, self.split, self.where = source, dataset, split, where

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"CheckedSource({self.dataset}, split={self.split!r}, {len(self)} records, {self.where})"

    def _unreadable(self, index, error: Exception) -> DatasetError:
        return DatasetError(f"dataset {self.dataset}: record {index} of split {self.split!r} cannot be read "
                            f"({type(error).__name__}: {' '.join(str(error).split())}); the dataset's files under "
                            f"{self.where} are damaged: delete that directory to rebuild it (or restore it)")

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) and not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of split {self.split!r} is out of range (0..{len(self) - 1})")
        try:
            return self.source[index]
        except Exception as e:  # riegeli's hash mismatch, a record that does not decode
            raise self._unreadable(index, e) from e

    def __getitems__(self, indices):
        try:
            return self.source.__getitems__(indices)
        except Exception:  # read them one by one, so the error names the damaged record
            return [self[i] for i in indices]

    def __getattr__(self, name):
        if name in ("source", "dataset", "split", "where"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


# ----------------------------------------------------------------------------
# Real datasets, built from files the user has (sdsup.data.real). Each builds from what data.path
# names, so `prepare` builds them here (builds_offline); their builders raise a DatasetError naming
# data.path when it is not set. Captions are real sentences, never flipped (flip_caption=None).
# ----------------------------------------------------------------------------


def _ade20k_builder(data_config):
    from sdsup.data.real import ade20k  # deferred: tensorflow_datasets is heavy; only building needs it

    return ade20k.make_builder(data_config)


def _cityscapes_builder(data_config):
    from sdsup.data.real import cityscapes  # deferred: tensorflow_datasets is heavy; only building needs it

    return cityscapes.make_builder(data_config)


def _coco_stuff_builder(data_config):
    from sdsup.data.real import coco_stuff  # deferred: tensorflow_datasets is heavy; only building needs it

    return coco_stuff.make_builder(data_config)


def _folder_builder(data_config):
    from sdsup.data.real import folder  # deferred: tensorflow_datasets is heavy; only building needs it

    return folder.make_builder(data_config)


def _folder_spec(data_config) -> DatasetSpec:
    """The `folder` spec with the classes of data.path's class file (ignore id 255, as its records store it)."""
    path = data_config.get("path") if hasattr(data_config, "get") else None
    if not path:
        raise DatasetError("dataset folder is built from your files: set data.path to the folder holding images/, "
                           "labels/ and classes.txt or classes.json")
    try:
        class_file = _classfile.read(os.path.abspath(os.path.expanduser(str(path))))
    except _classfile.ClassFileError as e:
        raise DatasetError(str(e)) from None
    return dataclasses.replace(FOLDER, class_names=class_file.names, palette=class_file.palette, configure=None)


def _real_spec(name, class_names, palette, make_builder, **kwargs) -> DatasetSpec:
    return DatasetSpec(name=name, class_names=tuple(class_names), palette=tuple(tuple(c) for c in palette),
                       ignore_id=_real_classes.IGNORE_ID, caption_source="field:caption", make_builder=make_builder,
                       builds_offline=True, default_tokenizer="clip", splits=("train", "validation"),
                       flip_caption=None, **kwargs)


ADE20K = register(_real_spec("ade20k", _real_classes.ADE20K_CLASSES, _real_classes.ADE20K_PALETTE,
                             _ade20k_builder))
CITYSCAPES = register(_real_spec("cityscapes", _real_classes.CITYSCAPES_CLASSES, _real_classes.CITYSCAPES_PALETTE,
                                 _cityscapes_builder))
COCO_STUFF = register(_real_spec("coco_stuff", _real_classes.COCO_STUFF_CLASSES, _real_classes.COCO_STUFF_PALETTE,
                                 _coco_stuff_builder, class_phrases=_real_classes.COCO_STUFF_PHRASES))
# No classes until configured: `for_config` returns the spec of data.path's class file.
FOLDER = register(_real_spec("folder", (), (), _folder_builder, configure=_folder_spec))
