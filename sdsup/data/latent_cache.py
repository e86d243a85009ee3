"""The latent cache: per training example, what frozen networks would compute from it on every step.

ALDM's step encodes each image with the VAE, each caption with the text
encoder and, on adversarial steps, decodes the real latents again (the
"real" image the discriminator sees). None of it trains, so a one-time pass
(`sdsup.aldm.write_latent_cache`) stores, per example of the train split,

  latent_mean, latent_logvar  float16 [2, h, w, C]  the VAE posterior of the image and of its mirror
                                                    image (index 0: as stored, 1: flipped), so the
                                                    random flip stays exact;
  reconstruction              uint8 [2, n]         PNG bytes of decode(mean) for each orientation;
  context                     float16 [O, K, L, D] the text encoder's states of each of its K captions
                                                    (O = 2 where the dataset flips captions with the
                                                    image: the mirror's captions second; else 1);

as array_record shards of safetensors-serialised records, one shard per
writing process, with a manifest naming what they were computed from. The
training pipeline reads them at the same index as the dataset's record
(`CachedSource`); `pipeline.Preprocess` picks the orientation and the
caption, and the step uses them instead of the encoders.

The cache needs the training geometry to be deterministic (no random crop):
a crop drawn per step has no fixed latents. Cityscapes' random 512x512 crops
of 512x1024 frames therefore train without it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Dict, Sequence, Tuple

import numpy as np
import safetensors.numpy
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from sdsup.errors import SdsupError

MANIFEST = "manifest.json"
FORMAT = 1
FIELDS = ("latent_mean", "latent_logvar", "reconstruction", "context")


class CacheError(SdsupError):
    """A latent cache that is missing, incomplete, or was computed from something else."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a cache was computed from; a run uses a cache only if every field equals its own."""

    dataset: str  # the dataset's build (its tfds directory)
    num_examples: int
    image_size: int
    latent_shape: Tuple[int, int, int]
    context_shape: Tuple[int, int]  # (L, D) per caption
    flipped_captions: bool  # whether the mirror image's captions differ (the dataset's flip_caption hook)
    models: str  # fingerprint of the VAE and text encoder weights and configs
    shards: int = 1
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        raw = json.loads(text)
        raw["latent_shape"], raw["context_shape"] = tuple(raw["latent_shape"]), tuple(raw["context_shape"])
        return cls(**raw)


def shard_range(num_examples: int, shard: int, shards: int) -> Tuple[int, int]:
    """The contiguous [start, stop) of examples shard `shard` of `shards` holds."""
    return num_examples * shard // shards, num_examples * (shard + 1) // shards


def shard_path(directory: str, shard: int, shards: int) -> str:
    return os.path.join(directory, f"cache.array_record-{shard:05d}-of-{shards:05d}")


def png_bytes(image: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), np.uint8)


def encode_record(latent_mean, latent_logvar, reconstructions: Sequence[np.ndarray], context) -> bytes:
    """One example's cached arrays -> bytes (safetensors: no pickle, the same on every platform)."""
    pngs = [png_bytes(r) for r in reconstructions]
    lengths = np.array([len(p) for p in pngs], np.int64)
    return safetensors.numpy.save({
        "latent_mean": np.asarray(latent_mean, np.float16), "latent_logvar": np.asarray(latent_logvar, np.float16),
        "reconstruction": np.concatenate(pngs), "reconstruction_lengths": lengths,
        "context": np.asarray(context, np.float16)})


def decode_record(data: bytes) -> Dict[str, np.ndarray]:
    """bytes -> {latent_mean, latent_logvar: float16 [2, h, w, C], reconstruction: uint8 [2, H, W, 3],
    context: float16 [O, K, L, D]}."""
    raw = safetensors.numpy.load(data)
    offsets = np.concatenate([[0], np.cumsum(raw["reconstruction_lengths"])])
    images = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        with Image.open(io.BytesIO(raw["reconstruction"][start:stop].tobytes())) as img:
            images.append(np.asarray(img.convert("RGB")))
    return {"latent_mean": raw["latent_mean"], "latent_logvar": raw["latent_logvar"],
            "reconstruction": np.stack(images), "context": raw["context"]}


class ShardWriter:
    """Writes one shard's records in order, then (`close`) marks it complete; a crash leaves no complete shard."""

    def __init__(self, directory: str, shard: int, shards: int):
        os.makedirs(directory, exist_ok=True)
        self.path = shard_path(directory, shard, shards)
        self._partial = self.path + ".partial"
        self._writer = ArrayRecordWriter(self._partial, "group_size:1")
        self.count = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        os.replace(self._partial, self.path)


def write_manifest(directory: str, manifest: Manifest) -> None:
    tmp = os.path.join(directory, MANIFEST + ".partial")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def read_manifest(directory: str):
    """The cache's Manifest, or None when there is no complete cache in `directory`."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = Manifest.from_json(f.read())
    if not all(os.path.exists(shard_path(directory, s, manifest.shards)) for s in range(manifest.shards)):
        return None
    return manifest


class CachedSource:
    """A dataset split's records with their cached arrays merged in (random access, picklable for grain workers)."""

    def __init__(self, source, directory: str, expected: Manifest):
        manifest = read_manifest(directory)
        if manifest is None:
            raise CacheError(f"no complete latent cache in {directory}")
        if manifest != expected:
            raise CacheError(f"the latent cache in {directory} was computed from something else "
                             f"({_difference(manifest, expected)}); delete it to recompute")
        if len(source) != manifest.num_examples:
            raise CacheError(f"the latent cache in {directory} holds {manifest.num_examples} examples, "
                             f"the split {len(source)}")
        self.source, self.directory, self.manifest = source, directory, manifest
        self._readers = None

    def __len__(self) -> int:
        return len(self.source)

    def _shard(self, index: int) -> Tuple[int, int]:
        for shard in range(self.manifest.shards):
            start, stop = shard_range(self.manifest.num_examples, shard, self.manifest.shards)
            if start <= index < stop:
                return shard, index - start
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict:
        if self._readers is None:  # opened lazily: in each grain worker, not pickled
            self._readers = [ArrayRecordReader(shard_path(self.directory, s, self.manifest.shards),
                                               "readahead_buffer_size:0")
                             for s in range(self.manifest.shards)]
        shard, local = self._shard(int(index))
        record = dict(self.source[int(index)])
        record.update(decode_record(self._readers[shard].read([local])[0]))
        return record

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = None
        return state


def _difference(got: Manifest, want: Manifest) -> str:
    diffs = [f"{f.name}: {getattr(got, f.name)!r} != {getattr(want, f.name)!r}"
             for f in dataclasses.fields(Manifest) if getattr(got, f.name) != getattr(want, f.name)]
    return "; ".join(diffs)
