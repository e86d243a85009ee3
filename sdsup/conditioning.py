"""How images, prompts and layouts become model inputs, the same in training steps and in sampling.

Images: uint8 [0, 255] -> float32 [-1, 1]. Text: token ids -> the text encoder's last hidden states, with the padding
mask the tokenizer asks for. Layouts: class-id maps -> the conditioner's hint
(palette colours or per-class embedding vectors), ignore pixels handled as
the dataset says.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdsup.models import controlnet as controlnet_lib
from sdsup.models.clip_text import CLIPTextTransformer


def images_to_float(images):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class Prompting:
    """What encoding a prompt needs of the tokenizer: the empty prompt's ids and the pad id to mask.

    `pad_id` None: no padding mask (Stable Diffusion's convention, for CLIP
    tokenizers whose pad token is <|endoftext|>); otherwise padding is masked
    out of attention (the scenes' word tokenizer).
    """

    empty_ids: tuple
    pad_id: Optional[int]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Prompting":
        return cls(tuple(int(i) for i in tokenizer.encode("")),
                   tokenizer.pad_id if tokenizer.masks_padding else None)

    @property
    def empty(self) -> np.ndarray:
        """[L] int32: the empty prompt (caption dropout, the unconditional branch of guidance)."""
        return np.asarray(self.empty_ids, np.int32)


def encode_text(text_model: CLIPTextTransformer, params, tokens, pad_id: Optional[int]):
    """[B, L] token ids -> the text encoder's last hidden states [B, L, D]."""
    mask = None if pad_id is None else tokens != pad_id
    return text_model.apply({"params": params}, tokens, attention_mask=mask).last_hidden_state


@dataclasses.dataclass(frozen=True)
class LayoutEncoding:
    """What turning a class map into a hint needs besides the conditioner's config: the dataset's palette and ignore id."""

    palette: tuple  # ((r, g, b), ...) per class
    ignore_id: int

    @classmethod
    def from_spec(cls, spec) -> "LayoutEncoding":
        return cls(tuple(tuple(int(v) for v in c) for c in spec.palette), int(spec.ignore_id))

    def hint(self, labels, cn_config, table):
        """[B, H, W] class ids -> the conditioner's hint for `cn_config.layout_encoding`."""
        return controlnet_lib.layout_hint(jnp.asarray(labels, jnp.int32), cn_config,
                                          palette=jnp.asarray(np.asarray(self.palette, np.uint8)),
                                          table=None if table is None else jnp.asarray(table),
                                          ignore_id=self.ignore_id)


def class_table(text_model: CLIPTextTransformer, params, tokenizer, phrases, template: str, norm: str,
                jit=None) -> np.ndarray:
    """[N, D]: the text encoder's pooled embedding of `template` filled with each class's phrase (ALDM's encoding).

    With `norm = "standardize"` the vectors are centred over the classes and
    each scaled to norm sqrt(D) (entries of unit mean square, every class
    equally strong). Pooled embeddings of short prompts share most of their
    direction (a small text encoder trained on the scenes gives mean pairwise
    cosine ~0.94), so the raw vectors barely tell the classes apart;
    standardised ones do. "none" keeps ALDM's raw vectors.
    """
    tokens = jnp.asarray(tokenizer.encode_batch([template.format(phrase) for phrase in phrases]))
    pad = Prompting.from_tokenizer(tokenizer).pad_id

    def pooled(params, tokens):
        mask = None if pad is None else tokens != pad
        return text_model.apply({"params": params}, tokens, attention_mask=mask).pooled_output

    table = np.asarray((jit or jax.jit)(pooled)(params, tokens), np.float32)
    return normalize_table(table, norm)


def normalize_table(table: np.ndarray, how: str) -> np.ndarray:
    """`class_table`'s normalisation: "none" or "standardize" (centred, each row of norm sqrt(D))."""
    if how == "none":
        return table
    if how == "standardize":
        centred = table - table.mean(0, keepdims=True)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        return (centred * np.sqrt(table.shape[1]) / np.maximum(norms, 1e-6)).astype(np.float32)
    raise ValueError(f"control.class_table_norm must be 'none' or 'standardize', got {how!r}")
