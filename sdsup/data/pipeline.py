"""Input pipeline: grain over a tfds array_record source, sharded by process.

Order of operations (train):
  source -> global shuffle (seed) -> this process's slice -> repeat (reshuffled
  every epoch) -> per-example random map (flip + tokenize) -> batch -> threads.

Every process shuffles with the same seed and then takes every
`process_count`-th example, so processes read disjoint shards whose union is
the epoch. The iterator's state (`get_state`/`set_state`) is a small dict
that the trainer checkpoints, so a resumed run sees exactly the examples an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Callable, Optional, Tuple

import grain
from absl import flags
import numpy as np
from PIL import Image

Batch = dict  # name -> np.ndarray with a leading batch dimension


def text(value) -> str:
    """A caption feature (bytes from tfds, or str) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


RESIZE_MODES = ("stretch", "keep_aspect")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a record's image and label map become the square the models see (real datasets' files, at read time).

    `size`: the side of that square. `resize`: (H, W) the image is resized to
    first; () means (size, size). "stretch" resizes to exactly that, aspect
    not kept (ALDM's ADE20K and COCO-Stuff: 512x512; Cityscapes: 512x1024,
    then cropped); "keep_aspect" scales the shorter side to min(resize) and
    keeps the aspect. A random size x size crop follows in training, a centred
    one in evaluation, or none (`crop=False`: ALDM evaluates Cityscapes on the
    whole 512x1024 frame). Images resize with Lanczos (as ALDM), label maps with
    nearest neighbour. Records already `size` x `size` arrays (the scenes)
    pass unchanged.
    """

    size: int
    resize: Tuple[int, ...] = ()
    mode: str = "stretch"

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {self.mode!r}")
        h, w = self.target
        if h < self.size or w < self.size:
            raise ValueError(f"resize {self.target} is smaller than the {self.size}x{self.size} crop")

    @property
    def target(self) -> Tuple[int, int]:
        return (int(self.resize[0]), int(self.resize[1])) if self.resize else (self.size, self.size)

    def apply(self, image, label, rng: Optional[np.random.Generator],
              crop: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """(uint8 [size, size, 3], uint8 [size, size]); a random crop with `rng`, centred without; with
        `crop=False` the whole resized frame (uint8 [H, W, 3], [H, W])."""
        image, label = decode_image(image), decode_label(label)
        if image.shape[:2] == (self.size, self.size) and label.shape == (self.size, self.size):
            return image, label
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label map {label.shape} differ in size")
        h, w = self._resized_shape(image.shape[:2])
        if (h, w) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))
            label = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
        if not crop:
            return image, label
        top, left = ((int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))) if rng is not None
                     else ((h - self.size) // 2, (w - self.size) // 2))
        return image[top:top + self.size, left:left + self.size], label[top:top + self.size, left:left + self.size]

    @property
    def deterministic(self) -> bool:
        """Whether training sees one fixed crop of each example (no random crop): what a latent cache needs."""
        return self.mode == "stretch" and self.target == (self.size, self.size)

    def label_only(self, label) -> np.ndarray:
        """The label map as `apply` makes it for a deterministic geometry (the image comes from a latent cache)."""
        if not self.deterministic:
            raise ValueError("label_only needs a geometry without random crops")
        label = decode_label(label)
        if label.shape != (self.size, self.size):
            label = np.asarray(Image.fromarray(label).resize((self.size, self.size), Image.Resampling.NEAREST))
        return label

    def _resized_shape(self, shape) -> Tuple[int, int]:
        if self.mode == "stretch":
            return self.target
        short = min(self.target)
        scale = short / min(shape)
        return max(short, round(shape[0] * scale)), max(short, round(shape[1] * scale))


def decode_image(value) -> np.ndarray:
    """An image record field -> uint8 [H, W, 3]: an array as it is, encoded bytes (JPEG, PNG) decoded."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value
    with Image.open(io.BytesIO(_bytes(value))) as img:
        return np.asarray(img.convert("RGB"))


def decode_label(value) -> np.ndarray:
    """A label record field -> uint8 [H, W] class ids: an array as it is, PNG bytes decoded."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value
    with Image.open(io.BytesIO(_bytes(value))) as img:
        ids = np.asarray(img)
    if ids.ndim != 2:
        raise ValueError(f"a label map must have one channel of class ids, got shape {ids.shape}")
    return ids.astype(np.uint8)


def _bytes(value) -> bytes:
    return value.item() if isinstance(value, np.ndarray) else bytes(value)


def pick_caption(record: dict, caption_field: str, rng: Optional[np.random.Generator]) -> Tuple[int, str]:
    """(index, caption): the record's caption; where it has several (`captions`, a JSON list: COCO's five), one
    drawn with `rng` (per example and epoch, so a resumed run draws the same), the first without."""
    if "captions" in record:
        captions = json.loads(text(record["captions"]))
        if captions:
            index = int(rng.integers(len(captions))) if rng is not None else 0
            return index, str(captions[index])
    return 0, text(record[caption_field])


def record_captions(record: dict, caption_field: str) -> list:
    """Every caption of a record, in `pick_caption`'s index order."""
    if "captions" in record:
        captions = json.loads(text(record["captions"]))
        if captions:
            return [str(c) for c in captions]
    return [text(record[caption_field])]


@dataclasses.dataclass
class Preprocess(grain.transforms.RandomMap):
    """Decode and crop (`geometry`), random horizontal flip (image, label map and caption together) + tokens."""

    tokenizer: Any
    caption_field: str = "caption"
    flip: bool = True
    keep_metadata: bool = False  # also pass the caption text and record index
    # The caption of the flipped picture (the dataset's `DatasetSpec.flip_caption`); None keeps it.
    flip_caption: Optional[Callable[[str], str]] = None
    geometry: Optional[Geometry] = None  # None: records hold the final arrays (the scenes)
    train: bool = True  # random crops and caption draws; evaluation takes centred crops and first captions
    full_frame: bool = False  # evaluation only: the whole resized frame, no crop
    # Fields computed from the finished example (after crop and flip), e.g. `planning.PlanTokens`.
    derive: Optional[Callable[[dict], dict]] = None

    def random_map(self, record: dict, rng: Optional[np.random.Generator]) -> dict:
        draw = rng if self.train else None
        cached = "latent_mean" in record  # a `latent_cache.CachedSource` record: no image to decode
        image, label = record["image"], record["label"]
        if self.geometry is not None:
            if cached:
                label = self.geometry.label_only(label)
            else:
                image, label = self.geometry.apply(image, label, draw, crop=self.train or not self.full_frame)
        caption_index, caption = pick_caption(record, self.caption_field, draw)
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            label = label[:, ::-1]
            image = image if cached else image[:, ::-1]
            if self.flip_caption is not None:
                caption = self.flip_caption(caption)
        out = {"label": np.ascontiguousarray(label), "tokens": self.tokenizer.encode(caption)}
        if cached:
            # The cache holds both orientations of the image (and of the captions, where flipping changes them).
            out["latent_mean"] = record["latent_mean"][int(flipped)]
            out["latent_logvar"] = record["latent_logvar"][int(flipped)]
            out["reconstruction"] = record["reconstruction"][int(flipped)]
            contexts = record["context"]
            out["context"] = contexts[min(int(flipped), len(contexts) - 1), caption_index]
        else:
            out["image"] = np.ascontiguousarray(image)
        if self.keep_metadata:
            out["caption"] = caption
            out["index"] = np.int64(record.get("index", -1))
        if self.derive is not None:
            out.update(self.derive(out))
        return out


def _check_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"the global batch size must be positive, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    return global_batch_size // process_count


def train_dataset(source, *, tokenizer, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, flip: bool = True,
                  caption_field: str = "caption", num_epochs: Optional[int] = None,
                  num_threads: int = 2, prefetch: int = 4, keep_metadata: bool = False,
                  flip_caption: Optional[Callable[[str], str]] = None,
                  geometry: Optional[Geometry] = None, num_workers: int = 0,
                  derive: Optional[Callable[[dict], dict]] = None) -> grain.IterDataset:
    """An endless (or `num_epochs`) stream of this process's batches (`derive`: see `Preprocess`).

    `num_workers` > 0 decodes and resizes in that many grain worker processes,
    each making whole batches (batch k comes from worker k mod num_workers),
    so the stream and its resumable state are the same as with threads alone;
    close the iterator (`it.close()`) to stop them.
    """
    local_batch = _check_batch(global_batch_size, process_count)
    if len(source) < process_count:
        raise ValueError(f"{len(source)} examples cannot be split over {process_count} processes")
    ds = grain.MapDataset.source(source).seed(seed)
    ds = ds.shuffle()[process_index::process_count]
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(Preprocess(tokenizer, caption_field, flip=flip, keep_metadata=keep_metadata,
                                  flip_caption=flip_caption, geometry=geometry, derive=derive))
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers; a library caller
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks) has not parsed any: take the defaults
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
    return ds


def eval_batches(source, *, tokenizer, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, caption_field: str = "caption", limit: Optional[int] = None,
                 geometry: Optional[Geometry] = None, full_frame: bool = False):
    """One pass over (the first `limit` examples of) a split, in order, no augmentation; centred crops, or
    with `full_frame` the whole resized frames.

    Every process yields the same number of equally sized batches, as a global
    array needs; padding examples repeat the last real one and have
    `mask == False`. Batches keep the caption text and the record index.
    """
    local_batch = _check_batch(global_batch_size, process_count)
    n = len(source) if limit is None else min(limit, len(source))
    per_process = -(-n // process_count)
    num_batches = -(-per_process // local_batch)
    pre = Preprocess(tokenizer, caption_field, flip=False, keep_metadata=True, geometry=geometry, train=False,
                     full_frame=full_frame)
    indices = np.arange(process_index, n, process_count)
    for b in range(num_batches):
        chunk = indices[b * local_batch:(b + 1) * local_batch]
        mask = np.zeros(local_batch, bool)
        mask[: len(chunk)] = True
        if len(chunk) == 0:  # this process ran out first: pad with example 0
            chunk = np.array([0])
        chunk = np.concatenate([chunk, np.full(local_batch - len(chunk), chunk[-1])])
        examples = [pre.random_map(source[int(i)], None) for i in chunk]
        batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "label", "tokens")}
        batch["caption"] = [e["caption"] for e in examples]
        batch["index"] = chunk
        batch["mask"] = mask
        yield batch
