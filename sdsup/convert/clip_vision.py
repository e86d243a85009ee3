"""Convert CLIP vision-tower weights between transformers (PyTorch) and sdsup Flax, and load whole CLIP checkpoints.

Key names. A full `CLIPModel` checkpoint (openai/clip-vit-*) and
`CLIPVisionModelWithProjection` store the tower under `vision_model.`
(`vision_model.embeddings.patch_embedding.weight`, ...) and the projection as
`visual_projection.weight`; transformers 5's bare `CLIPVisionModel` has no
prefix (like its text model, see `sdsup.convert.clip_text`). Export writes the
prefixed form by default, `prefix=""` the bare one; import detects either.
Old checkpoints also carry the `embeddings.position_ids` buffer (an arange,
persistent before transformers 4.31): accepted with its size checked, dropped.

  Flax (CLIPVisionTransformer)                 PyTorch
  embeddings/class_embedding        (D,)       embeddings.class_embedding          (D,)
  embeddings/patch_embedding/kernel (p,p,C,D)  embeddings.patch_embedding.weight   (D,C,p,p)
  embeddings/position_embedding/embedding      embeddings.position_embedding.weight
  pre_layrnorm, encoder/layers_<i>/..., post_layernorm   the same names, "layers.<i>"

`load_clip` reads a transformers `CLIPModel` directory (config.json +
model.safetensors or its shards; safetensors only, never pickle) into both
towers' sdsup configs and params plus `logit_scale`, with the text tower
converted by `sdsup.convert.clip_text`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from sdsup.convert import clip_text as clip_text_convert
from sdsup.convert.safetensors_io import TRANSFORMERS_WEIGHTS, cast_floating, read_state_dict
from sdsup.convert.torch_layout import (
    ConversionError,
    Path,
    flatten,
    leaf_from_torch,
    leaf_to_torch,
    shapes_of,
    to_numpy,
    torch_key,
    torch_shape,
    unflatten,
)
from sdsup.errors import SdsupError
from sdsup.models.clip_text import CLIPTextConfig
from sdsup.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection, dummy_pixels

PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"
LOGIT_SCALE_KEY = "logit_scale"
SEQUENCE_NAMES = frozenset({"layers"})
_POSITION_IDS = "embeddings.position_ids"
_TOWER, _PROJECTION = "vision_model", "visual_projection"

CONFIG_FILE = "config.json"


class ClipConvertError(ConversionError, SdsupError):
    """A CLIP state dict, parameter tree or checkpoint directory that does not match its config."""


@functools.lru_cache(maxsize=16)
def _shapes(config: CLIPVisionConfig) -> Dict[Path, Tuple[int, ...]]:
    """Flat Flax shapes of CLIPVisionModelWithProjection (abstract: nothing is allocated)."""
    abstract = jax.eval_shape(CLIPVisionModelWithProjection(config).init, jax.random.key(0), dummy_pixels(config))
    return shapes_of(nn.meta.unbox(abstract["params"]))


def _expected(config: CLIPVisionConfig, with_projection: bool, prefix: str) -> Dict[str, Tuple[Path, Tuple[int, ...]]]:
    """torch key -> (path in the returned Flax tree, Flax shape)."""
    out = {}
    for path, shape in _shapes(config).items():
        if path[0] == _PROJECTION:
            if with_projection:
                out[PROJECTION_KEY] = (path, shape)
        else:
            out[prefix + torch_key(path[1:], SEQUENCE_NAMES)] = (path if with_projection else path[1:], shape)
    return out


def _leaf_to_torch(name: str, value: np.ndarray) -> np.ndarray:
    # class_embedding is a bare parameter on both sides, under the same name.
    return value if name == "class_embedding" else leaf_to_torch(name, value)[1]


def _detect_prefix(keys) -> str:
    if PREFIX + "embeddings.class_embedding" in keys:
        return PREFIX
    if "embeddings.class_embedding" in keys:
        return ""
    raise ClipConvertError(
        f"missing key '{PREFIX}embeddings.class_embedding' (or unprefixed 'embeddings.class_embedding'): "
        "not a CLIP vision state dict"
    )


def clip_vision_from_torch(
    state_dict: Mapping[str, Any],
    config: CLIPVisionConfig,
    *,
    with_projection: bool = False,
    prefix: Optional[str] = None,
) -> Dict[str, Any]:
    """transformers CLIPVisionModel(/WithProjection) state dict -> Flax variables.

    Values are anything `np.asarray` accepts (numpy arrays, safetensors numpy
    loads, CPU torch tensors, bfloat16 included). Dtypes are kept. Returns
    `{"params": tree}` of host numpy arrays for `CLIPVisionTransformer`, or
    for `CLIPVisionModelWithProjection` with `with_projection=True`.
    `prefix=None` detects `vision_model.` or no prefix.

    Raises ClipConvertError naming every missing, unexpected and wrongly
    shaped key.
    """
    keys = set(state_dict)
    if prefix is None:
        prefix = _detect_prefix(keys)
    expected = _expected(config, with_projection, prefix)
    position_ids = prefix + _POSITION_IDS

    problems = []
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected) - {position_ids})
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        hint = ""
        if PROJECTION_KEY in unexpected:
            hint = " (the state dict has a visual projection: pass with_projection=True)"
        problems.append(f"unexpected keys {unexpected}{hint}")
    if position_ids in keys:
        n = to_numpy(state_dict[position_ids]).size
        if n != config.num_positions:
            problems.append(f"{position_ids} has {n} entries, this config has {config.num_positions} positions "
                            f"((image_size / patch_size)^2 + 1)")

    flat = {}
    for key in sorted(keys & set(expected)):
        path, shape = expected[key]
        value = to_numpy(state_dict[key])
        want = torch_shape(path[-1], shape)
        if tuple(value.shape) != want:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, expected {want}")
            continue
        # Copy so the returned tree never aliases caller (e.g. torch) storage.
        flat[path] = np.array(leaf_from_torch(path[-1], value), copy=True, order="C")
    if problems:
        raise ClipConvertError("CLIP vision state dict does not match the config: " + "; ".join(problems))
    return {"params": unflatten(flat)}


def clip_vision_to_torch(
    params: Mapping[str, Any],
    config: CLIPVisionConfig,
    *,
    with_projection: bool = False,
    prefix: str = PREFIX,
) -> Dict[str, np.ndarray]:
    """Flax params -> transformers state dict of C-contiguous numpy arrays.

    `params` may be boxed (straight from `model.init`) or not, with or without
    the top-level `"params"` collection. Every Flax leaf must be consumed:
    extra, missing or wrongly shaped leaves raise ClipConvertError naming them.
    The result can be written with `safetensors.numpy.save_file`.
    """
    tree = nn.meta.unbox(params)
    if set(tree) == {"params"}:
        tree = tree["params"]
    expected = {path: (key, shape) for key, (path, shape) in _expected(config, with_projection, prefix).items()}
    flat = flatten(tree)

    problems = []
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"unexpected parameters {unexpected}")
    out: Dict[str, np.ndarray] = {}
    for path in sorted(set(flat) & set(expected)):
        key, shape = expected[path]
        value = to_numpy(flat[path])
        if tuple(value.shape) != tuple(shape):
            problems.append(f"{'/'.join(path)} -> {key}: shape {tuple(value.shape)}, expected {tuple(shape)}")
            continue
        out[key] = np.ascontiguousarray(_leaf_to_torch(path[-1], value))
    if problems:
        raise ClipConvertError("CLIP vision parameters do not match the config: " + "; ".join(problems))
    return out


# ---------------------------------------------------------------------------
# Whole CLIPModel checkpoints.


@dataclasses.dataclass
class ClipCheckpoint:
    """Both towers of a CLIPModel, as sdsup configs and (unboxed) params.

    text_params is a `CLIPTextModelWithProjection` tree (`text_model`,
    `text_projection`), vision_params a `CLIPVisionModelWithProjection` tree
    (`vision_model`, `visual_projection`); apply them as `{"params": ...}`.
    `logit_scale` is the stored log-temperature (CLIPModel multiplies cosines
    by its exp); CLIP score does not use it.
    """

    text_config: CLIPTextConfig
    text_params: Dict[str, Any]
    vision_config: CLIPVisionConfig
    vision_params: Dict[str, Any]
    logit_scale: float


def _merged_sub_config(d: Mapping[str, Any], name: str) -> Dict[str, Any]:
    # Checkpoints written by transformers < 4.25 (openai/clip-vit-*) carry
    # `<name>_dict` next to `<name>`; transformers lets the `_dict` values win.
    sub = dict(d.get(name) or {})
    sub.update(d.get(name + "_dict") or {})
    return sub


def clip_vision_config_from_transformers(config: Any) -> CLIPVisionConfig:
    """From a transformers CLIPVisionConfig / CLIPConfig or their dicts (config.json)."""
    return clip_text_convert.tower_config_from_transformers(CLIPVisionConfig, config, "vision_config")


def clip_vision_config_to_transformers(config: CLIPVisionConfig) -> dict:
    """Keyword arguments for `transformers.CLIPVisionConfig(**d)`."""
    return dataclasses.asdict(config)


def clip_configs_from_transformers(d: Mapping[str, Any]) -> Tuple[CLIPTextConfig, CLIPVisionConfig]:
    """(text, vision) configs of a transformers CLIPConfig dict (a CLIPModel's config.json)."""
    # CLIPModel builds both projections with the top-level projection_dim (default 512).
    projection_dim = d.get("projection_dim", 512)
    text = clip_text_convert.clip_text_config_from_transformers(
        {"text_config": _merged_sub_config(d, "text_config"), "projection_dim": projection_dim})
    vision = clip_vision_config_from_transformers(
        {"vision_config": _merged_sub_config(d, "vision_config"), "projection_dim": projection_dim})
    return text, vision


def clip_model_from_torch(
    state_dict: Mapping[str, Any],
    text_config: CLIPTextConfig,
    vision_config: CLIPVisionConfig,
    where: str = "CLIPModel state dict",
) -> Tuple[Dict[str, Any], Dict[str, Any], float]:
    """A full CLIPModel state dict -> (text params, vision params, logit_scale)."""
    text_prefix, text_projection = clip_text_convert.PREFIX, clip_text_convert.PROJECTION_KEY
    text_keys = {k for k in state_dict if k.startswith(text_prefix) or k == text_projection}
    vision_keys = {k for k in state_dict if k.startswith(PREFIX) or k == PROJECTION_KEY}
    other = sorted(set(state_dict) - text_keys - vision_keys - {LOGIT_SCALE_KEY})
    missing = [k for k in (LOGIT_SCALE_KEY, clip_text_convert.PROJECTION_KEY, PROJECTION_KEY) if k not in state_dict]
    if missing or other:
        raise ClipConvertError(f"{where}: not a CLIPModel state dict: missing keys {missing}, unexpected keys {other}")
    try:
        text = clip_text_convert.clip_text_from_torch(
            {k: state_dict[k] for k in text_keys}, text_config, with_projection=True, prefix=clip_text_convert.PREFIX)
    except (KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ClipConvertError(f"{where}: text tower: {message}") from None
    try:
        vision = clip_vision_from_torch(
            {k: state_dict[k] for k in vision_keys}, vision_config, with_projection=True, prefix=PREFIX)
    except ClipConvertError as e:
        raise ClipConvertError(f"{where}: vision tower: {e}") from None
    scale = to_numpy(state_dict[LOGIT_SCALE_KEY])
    if scale.size != 1:
        raise ClipConvertError(f"{where}: {LOGIT_SCALE_KEY!r} has shape {scale.shape}, expected a scalar")
    return text["params"], vision["params"], float(scale.reshape(()))


def load_clip(directory: str, dtype: Optional[Any] = None) -> ClipCheckpoint:
    """A transformers CLIPModel directory (e.g. openai/clip-vit-large-patch14, downloaded) -> ClipCheckpoint.

    Reads `config.json` and `model.safetensors` (or `model.safetensors.index.json`
    and its shards); a directory with only pickle weights (.bin) is refused,
    never unpickled. `dtype` (e.g. np.float32) casts floating weights; by
    default they keep their stored dtype. Errors (missing files, a non-CLIP
    config, missing/unexpected/mis-shaped keys) raise an SdsupError naming
    the file and key.
    """
    if not os.path.isdir(directory):
        raise ClipConvertError(f"CLIP model directory not found: {directory}")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ClipConvertError(f"{directory} has no {CONFIG_FILE} (expected a transformers CLIPModel directory)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config_json = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClipConvertError(f"{config_path} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(config_json, dict):
        raise ClipConvertError(f"{config_path} is not a JSON object")
    model_type = config_json.get("model_type")
    if model_type != "clip":
        raise ClipConvertError(
            f"{config_path} has model_type {model_type!r}; expected 'clip' (a full CLIPModel with both towers)")
    try:
        text_config, vision_config = clip_configs_from_transformers(config_json)
    except (TypeError, ValueError) as e:
        raise ClipConvertError(f"{config_path}: {e}") from e

    state, files = read_state_dict(directory, TRANSFORMERS_WEIGHTS)  # model.safetensors or its shards
    state = cast_floating(state, dtype)
    where = ", ".join(os.path.basename(f) for f in files)
    text, vision, scale = clip_model_from_torch(state, text_config, vision_config, where=f"{directory} ({where})")
    return ClipCheckpoint(text_config, text, vision_config, vision, scale)
