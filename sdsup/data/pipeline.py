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
from typing import Any, Callable, Optional

import grain
import numpy as np

Batch = dict  # name -> np.ndarray with a leading batch dimension


def text(value) -> str:
    """A caption feature (bytes from tfds, or str) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class Preprocess(grain.transforms.RandomMap):
    """Random horizontal flip (image, label map and caption together) + tokens."""

    tokenizer: Any
    caption_field: str = "caption"
    flip: bool = True
    keep_metadata: bool = False  # also pass the caption text and record index
    # The caption of the flipped picture (the dataset's `DatasetSpec.flip_caption`); None keeps it.
    flip_caption: Optional[Callable[[str], str]] = None

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        image, label = record["image"], record["label"]
        caption = text(record[self.caption_field])
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
            if self.flip_caption is not None:
                caption = self.flip_caption(caption)
        out = {
            "image": np.ascontiguousarray(image),
            "label": np.ascontiguousarray(label),
            "tokens": self.tokenizer.encode(caption),
        }
        if self.keep_metadata:
            out["caption"] = caption
            out["index"] = np.int64(record.get("index", -1))
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
                  flip_caption: Optional[Callable[[str], str]] = None) -> grain.IterDataset:
    """An endless (or `num_epochs`) stream of this process's batches."""
    local_batch = _check_batch(global_batch_size, process_count)
    if len(source) < process_count:
        raise ValueError(f"{len(source)} examples cannot be split over {process_count} processes")
    ds = grain.MapDataset.source(source).seed(seed)
    ds = ds.shuffle()[process_index::process_count]
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(Preprocess(tokenizer, caption_field, flip=flip, keep_metadata=keep_metadata,
                                  flip_caption=flip_caption))
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def eval_batches(source, *, tokenizer, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, caption_field: str = "caption", limit: Optional[int] = None):
    """One pass over (the first `limit` examples of) a split, in order, no augmentation.

    Every process yields the same number of equally sized batches, as a global
    array needs; padding examples repeat the last real one and have
    `mask == False`. Batches keep the caption text and the record index.
    """
    local_batch = _check_batch(global_batch_size, process_count)
    n = len(source) if limit is None else min(limit, len(source))
    per_process = -(-n // process_count)
    num_batches = -(-per_process // local_batch)
    pre = Preprocess(tokenizer, caption_field, flip=False, keep_metadata=True)
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
