"""An opened dataset: its spec, its tfds builder and the run's tokenizer, with the batches everything reads.

Stages, the evaluation and the ablation read examples only through a
`Dataset`, so the split sources, the tokenizer and the caption hooks are set
up in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import jax
from jax.experimental import multihost_utils

from sdsup.data import pipeline, registry, tokenizers


@dataclasses.dataclass
class Dataset:
    spec: registry.DatasetSpec
    builder: Any  # the tfds builder (array_record)
    tokenizer: Any
    geometry: Optional[pipeline.Geometry] = None  # decode, resize, crop at read time (`geometry(config)`)

    @classmethod
    def open(cls, config, tokenizer=None) -> "Dataset":
        """The config's dataset (with `tokenizer`, default the one config.text names), built first where it
        can be built here and is not yet.

        Process 0 prepares it first so processes sharing a data_dir never race;
        the others then find it built (or build their own local copy).
        """
        spec = registry.for_config(config.data)
        if jax.process_index() == 0:
            builder = registry.prepare(spec, config.data)
        multihost_utils.sync_global_devices("dataset prepared")
        if jax.process_index() != 0:
            builder = registry.prepare(spec, config.data)
        return cls(spec, builder, tokenizer if tokenizer is not None else text_tokenizer(config), geometry(config))

    def source(self, split: str):
        """Random-access source of decoded records of a split."""
        return registry.data_source(self.spec, self.builder, split)

    def eval_batches(self, split: str, batch_size: int, limit: Optional[int] = None,
                     full_frame: bool = False) -> Iterator[dict]:
        """One ordered pass over (the first `limit` examples of) a split, unaugmented, with captions and a mask;
        centred image_size crops, or with `full_frame` the whole resized frames (`data.resize`).

        Whole batches in every process: evaluations run host-local (see `pipeline.eval_batches`).
        """
        return pipeline.eval_batches(self.source(split), tokenizer=self.tokenizer, global_batch_size=batch_size,
                                     caption_field=self.spec.caption_field, limit=limit, geometry=self.geometry,
                                     full_frame=full_frame)

    def train_dataset(self, *, global_batch_size: int, seed: int, flip: bool, num_threads: int, prefetch: int,
                      num_workers: int = 0, source=None, derive=None):
        """This process's endless stream of augmented training batches (a resumable grain iterator), from the
        train split's records or `source` (the same records with more fields, e.g. a latent cache's); `derive`
        adds fields computed from each finished example (`pipeline.Preprocess.derive`)."""
        return pipeline.train_dataset(
            self.source("train") if source is None else source, tokenizer=self.tokenizer, global_batch_size=global_batch_size, seed=seed,
            process_index=jax.process_index(), process_count=jax.process_count(), flip=flip,
            caption_field=self.spec.caption_field, num_threads=num_threads, prefetch=prefetch,
            flip_caption=self.spec.flip_caption, geometry=self.geometry, num_workers=num_workers, derive=derive)


def text_tokenizer(config):
    """The tokenizer `config.text` names."""
    t = config.text
    return tokenizers.build(t.tokenizer, max_length=t.max_length, path=t.tokenizer_path)


def geometry(config) -> pipeline.Geometry:
    """How records become `data.image_size` squares (`data.resize`, `data.resize_mode`): real datasets' files are
    decoded, resized and cropped at read time; records that are already such arrays (the scenes) pass as they are."""
    return pipeline.Geometry(int(config.data.image_size), tuple(config.data.get("resize", ()) or ()),
                             config.data.get("resize_mode", "stretch"))
