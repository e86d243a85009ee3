"""CLIP score: how well generated images match their prompts, by a pretrained CLIP.

Definition (Hessel et al. 2021's CLIP-S with weight 100 instead of 2.5, as
torchmetrics documents it): for each (image, prompt) pair,
100 * max(cos(E_image, E_text), 0), with the embeddings of CLIPModel's
`get_image_features` / `get_text_features` (projected, then L2-normalised);
the score is the mean over pairs. torchmetrics' code clamps the *mean*
instead, max(mean(100 * cos), 0); the two agree unless some pair's cosine is
negative, which is rare with trained CLIP models. `ClipScoreResult` carries
the per-pair values and both aggregates. The customary model is
openai/clip-vit-large-patch14 (ViT-L/14, 224x224), which the user downloads;
nothing is fetched here.

Image preprocessing reproduces transformers' CLIPImageProcessor on uint8
images: resize the shortest side to image_size (bicubic, the other side
floored), centre crop, rescale by 1/255, normalise with CLIP's mean and std.
transformers 5 has two backends that differ slightly: `CLIPImageProcessorPil`
(Pillow) and the default torchvision one (torch's antialiased uint8 bicubic);
torchmetrics gets whichever is installed.

* `resize="pil"` (default) resizes with Pillow on the host exactly as
  `CLIPImageProcessorPil`: bitwise the same pixel values (tested).
* `resize="jax"` resizes on the device with `jax.image.resize` (antialiased
  Keys bicubic, a = -0.5, Pillow's kernel) in Pillow's two uint8 passes.

Measured against Pillow, both the jax path and torch's uint8 kernel (what the
torchvision backend runs) differ by at most 2 uint8 levels on about 1% of
the pixels when upsampling (64 -> 224), 1 level on under 0.5% when
downsampling: after normalisation <= 2 / (255 * 0.2613) ~= 0.03 per pixel
(tested: `RESIZE_MAX_LEVELS`). On the tests' tiny random CLIP the jax path
moved per-pair scores by < 0.001 points (of 100).

Prompts are tokenised by transformers' CLIPTokenizer from the CLIP directory
(`sdsup.data.tokenizers.ClipTokenizer`), padded to max_position_embeddings. A
prompt longer than that is cut to max_length - 1 tokens plus EOS (a logged
warning), as OpenAI's `clip.tokenize(truncate=True)`; torchmetrics instead
slices the ids, dropping EOS, so scores of over-long prompts differ from
its scores. The towers are jitted once per batch shape; the last batch is
padded to `batch_size` so a whole evaluation compiles each tower once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from sdsup.convert.clip_vision import load_clip
from sdsup.data.tokenizers import ClipTokenizer
from sdsup.errors import SdsupError
from sdsup.models.clip_text import LEGACY_EOS_TOKEN_ID, CLIPTextModelWithProjection
from sdsup.models.clip_vision import CLIPVisionModelWithProjection

# OpenAI CLIP's normalisation constants (transformers' OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_METHODS = ("pil", "jax")
# Largest |jax - pil| and |torchvision - pil| of resized uint8 pixels measured
# (upsampling 64 -> 224 and downsampling up to 1024 -> 224; test_clip_score.py).
RESIZE_MAX_LEVELS = 2

SKIP_NOTICE = (
    "CLIP score skipped: no CLIP model directory given. Point the evaluation at a local transformers CLIPModel "
    "directory (config.json, model.safetensors, tokenizer files; e.g. openai/clip-vit-large-patch14) to compute it."
)


class ClipScoreError(SdsupError, ValueError):
    """Bad input to CLIP score: image arrays, prompts, options or a model/tokenizer that do not fit together."""


# ---------------------------------------------------------------------------
# Preprocessing.


def resized_shape(height: int, width: int, size: int):
    """(h, w) with the shortest side = size and the other floored, as transformers and torchvision resize."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ClipScoreError(
            f"images must be uint8 [N, H, W, 3] in 0..255, got dtype {images.dtype} "
            "(convert floats in [0, 1] with np.round(x * 255).astype(np.uint8))")
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
        raise ClipScoreError(f"images must be uint8 [N, H, W, 3] with N, H, W > 0, got shape {images.shape}")
    return images


def _resize_pil(images: np.ndarray, height: int, width: int) -> np.ndarray:
    # Pillow resizes uint8 images with its fixed-point antialiased bicubic and
    # rounds to uint8, which is what CLIPImageProcessorPil hands on.
    return np.stack([
        np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC))
        for image in images
    ])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize_jax_uint8(images, height: int, width: int):
    def to_uint8_levels(x):
        return jnp.clip(jnp.round(x), 0, 255)

    # Pillow resizes 8-bit images in two separable passes, width first, and
    # stores the intermediate as uint8: the clip + round in between cuts
    # bicubic overshoot. Without it, upsampled noise differs from Pillow by up
    # to 21 levels; with it by <= 2 (measured), as torchvision's uint8 kernel.
    x = images.astype(jnp.float32)
    n, h, _, c = x.shape
    x = to_uint8_levels(jax.image.resize(x, (n, h, width, c), "bicubic", antialias=True))
    x = to_uint8_levels(jax.image.resize(x, (n, height, width, c), "bicubic", antialias=True))
    return x.astype(jnp.uint8)


def _resize_jax(images: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(_resize_jax_uint8(jnp.asarray(images), height, width))


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32, (x / 255 - mean) / std in CLIPImageProcessorPil's arithmetic."""
    # Rescale in float64, then normalise in float32: the order and precisions
    # transformers' numpy path uses, so the result is bitwise the same.
    x = (images.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess_uint8(images, image_size: int, resize: str = "pil") -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, image_size, image_size, 3]: shortest side resized, centre crop."""
    images = _check_images(images)
    if resize not in RESIZE_METHODS:
        raise ClipScoreError(f"resize={resize!r}; expected one of {RESIZE_METHODS}")
    _, h, w, _ = images.shape
    new_h, new_w = resized_shape(h, w, image_size)
    if (new_h, new_w) != (h, w):
        images = _resize_pil(images, new_h, new_w) if resize == "pil" else _resize_jax(images, new_h, new_w)
    # Floor the margin: transformers crops at (h - size) // 2.
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    return images[:, top:top + image_size, left:left + image_size]


def preprocess(images, image_size: int, resize: str = "pil") -> np.ndarray:
    """uint8 [N, H, W, 3] -> CLIP's float32 pixel values, NHWC [N, image_size, image_size, 3].

    The same values as transformers' CLIPImageProcessor(size={"shortest_edge": image_size},
    crop_size=image_size) in NCHW; see the module docstring for the tolerance.
    """
    return normalize(preprocess_uint8(images, image_size, resize))


# ---------------------------------------------------------------------------
# Scores.


@dataclasses.dataclass(frozen=True)
class ClipScoreResult:
    """CLIP scores of N (image, prompt) pairs."""

    per_pair: np.ndarray  # float64 [N], 100 * cos(image, text), not clamped

    @property
    def count(self) -> int:
        return int(self.per_pair.size)

    @property
    def score(self) -> float:
        """Mean over pairs of 100 * max(cos, 0): the definition torchmetrics documents."""
        return float(np.mean(np.maximum(self.per_pair, 0.0)))

    @property
    def torchmetrics_score(self) -> float:
        """max(mean(100 * cos), 0): what torchmetrics' code computes (equal unless a cosine is negative)."""
        return float(max(np.mean(self.per_pair), 0.0))

    @classmethod
    def concatenate(cls, results: Sequence["ClipScoreResult"]) -> "ClipScoreResult":
        """One result for batches scored separately (the mean is over all pairs, not over batches)."""
        return cls(np.concatenate([r.per_pair for r in results]))


def cosine_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """100 * cos between matching rows, in float64."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * np.sum(a * b, axis=-1)


class ClipScorer:
    """CLIP score with sdsup's Flax CLIP towers and a transformers CLIP tokenizer.

    Build it with `from_directory(path)` (a transformers CLIPModel directory)
    or, where the directory is optional, `from_config_path(path_or_None)`.
    """

    def __init__(self, checkpoint, tokenizer, *, batch_size: int = 32, resize: str = "pil", dtype: Any = jnp.float32):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ClipScoreError(f"batch_size must be a positive int, got {batch_size!r}")
        if resize not in RESIZE_METHODS:
            raise ClipScoreError(f"resize={resize!r}; expected one of {RESIZE_METHODS}")
        text_config, vision_config = checkpoint.text_config, checkpoint.vision_config
        if text_config.projection_dim != vision_config.projection_dim:
            raise ClipScoreError(
                f"text projection_dim {text_config.projection_dim} != vision projection_dim "
                f"{vision_config.projection_dim}: the towers do not share an embedding space")
        # A tokenizer that does not fit the text tower gives wrong scores silently
        # (out-of-range ids are clamped by the embedding lookup, a missing EOS pools position 0).
        if tokenizer.vocab_size > text_config.vocab_size:
            raise ClipScoreError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, the text tower only {text_config.vocab_size}")
        if text_config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            if tokenizer.eos_id != tokenizer.vocab_size - 1:
                raise ClipScoreError(
                    f"the text config pools at argmax(ids) (legacy eos_token_id 2), which needs EOS to be the "
                    f"largest id, but the tokenizer's EOS is {tokenizer.eos_id} of {tokenizer.vocab_size}")
        elif text_config.eos_token_id != tokenizer.eos_id:
            raise ClipScoreError(
                f"text config eos_token_id {text_config.eos_token_id} != the tokenizer's EOS id {tokenizer.eos_id}")
        if tokenizer.max_length > text_config.max_position_embeddings:
            raise ClipScoreError(
                f"tokenizer max_length {tokenizer.max_length} > max_position_embeddings "
                f"{text_config.max_position_embeddings}")

        self.text_config, self.vision_config = text_config, vision_config
        self.tokenizer = tokenizer
        self.batch_size, self.resize = batch_size, resize
        self.logit_scale = checkpoint.logit_scale
        text_model = CLIPTextModelWithProjection(text_config, dtype=dtype)
        vision_model = CLIPVisionModelWithProjection(vision_config, dtype=dtype)
        # Weights go to the device once; the jitted towers take them as arguments
        # so they are not baked into the executables as constants.
        self._text_params = jax.device_put(checkpoint.text_params)
        self._vision_params = jax.device_put(checkpoint.vision_params)
        # No attention mask: the text tower is causal and pools at EOS, so
        # padding after EOS cannot change the pooled embedding.
        self._embed_text = jax.jit(
            lambda p, ids: text_model.apply({"params": p}, ids).text_embeds.astype(jnp.float32))
        self._embed_image = jax.jit(
            lambda p, px: vision_model.apply({"params": p}, px).image_embeds.astype(jnp.float32))

    @classmethod
    def from_directory(cls, path: str, *, tokenizer_path: Optional[str] = None, **kwargs) -> "ClipScorer":
        """From a transformers CLIPModel directory; its tokenizer files, or those in `tokenizer_path`."""
        checkpoint = load_clip(path, dtype=np.float32)
        tokenizer = ClipTokenizer(tokenizer_path or path, max_length=checkpoint.text_config.max_position_embeddings)
        return cls(checkpoint, tokenizer, **kwargs)

    @classmethod
    def from_config_path(cls, path: Optional[str], **kwargs) -> Optional["ClipScorer"]:
        """A scorer, or None with a logged notice when no directory is configured (None or "").

        A path that is given but wrong raises: a typo must not silently skip the metric.
        """
        if not path:
            logging.warning(SKIP_NOTICE)
            return None
        return cls.from_directory(path, **kwargs)

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        # Repeat the first row so the padded batch has one compiled shape and valid inputs.
        missing = self.batch_size - x.shape[0]
        return x if missing == 0 else np.concatenate([x, np.repeat(x[:1], missing, axis=0)])

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 [N, projection_dim], projected and not normalised (CLIPModel.get_text_features)."""
        prompts = _check_prompts(prompts)
        ids = self.tokenizer.encode_batch(prompts).astype(np.int32)
        out = []
        for start, stop in self._batches(len(ids)):
            out.append(np.asarray(self._embed_text(self._text_params, self._pad(ids[start:stop])))[: stop - start])
        return np.concatenate(out)

    def image_embeddings(self, images) -> np.ndarray:
        """float32 [N, projection_dim] of uint8 [N, H, W, 3] images (CLIPModel.get_image_features)."""
        images = _check_images(images)
        out = []
        for start, stop in self._batches(len(images)):
            pixels = preprocess(images[start:stop], self.vision_config.image_size, self.resize)
            out.append(np.asarray(self._embed_image(self._vision_params, self._pad(pixels)))[: stop - start])
        return np.concatenate(out)

    def score(self, images, prompts: Sequence[str]) -> ClipScoreResult:
        """CLIP scores of uint8 images [N, H, W, 3] against N prompts (pair i = image i, prompt i)."""
        images = _check_images(images)
        prompts = _check_prompts(prompts)
        if len(images) != len(prompts):
            raise ClipScoreError(f"{len(images)} images but {len(prompts)} prompts; CLIP score needs pairs")
        return ClipScoreResult(cosine_scores(self.image_embeddings(images), self.text_embeddings(prompts)))


def _check_prompts(prompts) -> list:
    if isinstance(prompts, str):
        raise ClipScoreError("prompts must be a sequence of strings, got one string")
    prompts = list(prompts)
    if not prompts:
        raise ClipScoreError("no prompts given")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ClipScoreError(f"prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts
