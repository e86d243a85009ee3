"""diffusers ControlNetModel <-> sdsup ControlNetModel (config dicts, state dicts), export and class-embedding recipe.

Key names are diffusers' exactly. The encoder half (conv_in, time_embedding,
down_blocks.*, mid_block.*) has the UNet's keys and is mapped with the UNet
converter's sequence names (`sdsup.convert.unet.UNET_SEQUENCE_NAMES`); the
ControlNet adds

  controlnet_cond_embedding.conv_in / .blocks.N / .conv_out   (hint encoder)
  controlnet_down_blocks.N                                     (zero 1x1 convs)
  controlnet_mid_block

A directory written by `save_pretrained_controlnet` (config.json +
diffusion_pytorch_model.safetensors) loads with
`diffusers.ControlNetModel.from_pretrained(dir)`; config.json also carries
`_sdsup_layout_encoding` (diffusers ignores "_" keys).
"""

import functools
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from sdsup.convert import templates
from sdsup.convert.torch_layout import ConversionError, Path, params_from_torch, params_to_torch, shapes_of, to_numpy
from sdsup.convert.unet import UNET_SEQUENCE_NAMES, unet_config_from_diffusers, unet_config_to_diffusers
from sdsup.convert.versions import diffusers_version
from sdsup.models.controlnet import (
    COLOUR_HINT_CHANNELS,
    HINT_IMAGE_DOWNSAMPLE,
    ControlNetConfig,
    ControlNetModel,
    dummy_inputs,
    mirror_up_block_types,
)
from sdsup.models.unet import UNetConfig

CONTROLNET_SEQUENCE_NAMES = UNET_SEQUENCE_NAMES | {"controlnet_down_blocks", "blocks"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_EMBEDDINGS_NAME = "class_embeddings.safetensors"
CLASS_EMBEDDINGS_KEY = "class_embeddings"
# config.json entry (ignored by diffusers, as every "_" key) recording the layout encoding.
LAYOUT_ENCODING_KEY = "_sdsup_layout_encoding"

# diffusers ControlNetModel config keys that UNetConfig does not have, with the
# only value accepted (diffusers' default). conditioning_channels and
# conditioning_embedding_out_channels are ControlNetConfig fields.
_CONTROLNET_ONLY_KEYS: Dict[str, Any] = {
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}
# Encoder-irrelevant UNetConfig fields (ControlNetConfig normalises them), dropped on export.
_DECODER_FIELDS = ("sample_size", "out_channels", "up_block_types", "center_input_sample")


# ---------------------------------------------------------------------------
# Configs.


def controlnet_config_from_diffusers(
    config: Mapping[str, Any],
    layout_encoding: Optional[str] = None,
    vae_scale_factor: Optional[int] = None,
    **flax_options,
) -> ControlNetConfig:
    """A diffusers ControlNetModel config dict (e.g. a parsed config.json) as a ControlNetConfig.

    `layout_encoding`: given explicitly, else the `_sdsup_layout_encoding`
    entry that `save_pretrained_controlnet` writes, else inferred: "colour"
    for 3 conditioning channels, "class_embedding" otherwise.
    `vae_scale_factor`, when given, is checked against the hint encoder;
    otherwise it is what the hint encoder implies (8 for the usual ones).
    Unsupported diffusers features raise ValueError naming the key;
    `flax_options` sets the Flax-only UNetConfig fields.
    """
    config = dict(config)
    stored = config.get(LAYOUT_ENCODING_KEY)
    unet_keys = {}
    for key, value in config.items():
        if key.startswith("_") or key in ("conditioning_channels", "conditioning_embedding_out_channels"):
            continue
        if key in _CONTROLNET_ONLY_KEYS:
            if value != _CONTROLNET_ONLY_KEYS[key]:
                raise ValueError(
                    f"diffusers ControlNet config {key}={value!r} is not supported (only {_CONTROLNET_ONLY_KEYS[key]!r})"
                )
            continue
        if key in _DECODER_FIELDS:
            raise ValueError(f"unknown diffusers ControlNet config key {key!r}")
        unet_keys[key] = value
    down = unet_keys.get("down_block_types", UNetConfig.down_block_types)
    unet_keys["up_block_types"] = list(mirror_up_block_types(down))
    unet = unet_config_from_diffusers(unet_keys, **flax_options)
    channels = config.get("conditioning_channels", 3)
    hint = config.get("conditioning_embedding_out_channels", COLOUR_HINT_CHANNELS)
    if hint is None:
        raise ValueError("conditioning_embedding_out_channels=None is not supported")
    if layout_encoding is None:
        layout_encoding = stored
    if layout_encoding is None:
        layout_encoding = "colour" if channels == 3 else "class_embedding"
    if vae_scale_factor is None:
        vae_scale_factor = 2 ** (len(hint) - 1) * HINT_IMAGE_DOWNSAMPLE.get(layout_encoding, 1)
    return ControlNetConfig(unet, layout_encoding, channels, tuple(hint), vae_scale_factor)


def controlnet_config_to_diffusers(config: ControlNetConfig) -> Dict[str, Any]:
    """Config dict that diffusers' ControlNetModel(**cfg) accepts (layout_encoding is not in it)."""
    out = {k: v for k, v in unet_config_to_diffusers(config.unet).items() if k not in _DECODER_FIELDS}
    out["conditioning_channels"] = config.conditioning_channels
    out["conditioning_embedding_out_channels"] = list(config.conditioning_embedding_out_channels)
    out.update(_CONTROLNET_ONLY_KEYS)
    out["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    return out


# ---------------------------------------------------------------------------
# State dicts.


@functools.lru_cache(maxsize=16)
def controlnet_param_shapes(config: ControlNetConfig) -> Dict[Path, Tuple[int, ...]]:
    """Flat Flax parameter shapes of the ControlNet `config` describes (abstract: nothing is allocated)."""
    abstract = jax.eval_shape(ControlNetModel(config).init, jax.random.PRNGKey(0), *dummy_inputs(config))
    return shapes_of(nn.meta.unbox(abstract["params"]))


def controlnet_from_torch(
    state_dict: Mapping[str, Any], config: ControlNetConfig, dtype: Optional[Any] = None
) -> Dict[str, Any]:
    """diffusers ControlNetModel state dict (torch tensors or numpy arrays) -> Flax params (unboxed).

    Every key must be present with its exact shape; otherwise ConversionError
    names the missing, unexpected and mis-shaped keys.
    """
    return params_from_torch(
        state_dict, controlnet_param_shapes(config), CONTROLNET_SEQUENCE_NAMES, model="ControlNet", dtype=dtype
    )


def controlnet_to_torch(params: Mapping[str, Any], config: ControlNetConfig) -> Dict[str, np.ndarray]:
    """Flax ControlNet params (boxed or not; a {'params': ...} wrapper is accepted) -> diffusers state dict (numpy)."""
    if set(params) == {"params"}:
        params = params["params"]
    return params_to_torch(
        nn.meta.unbox(params), controlnet_param_shapes(config), CONTROLNET_SEQUENCE_NAMES, model="ControlNet"
    )


# ---------------------------------------------------------------------------
# diffusers directories.


def save_pretrained_controlnet(directory: str, params: Mapping[str, Any], config: ControlNetConfig) -> str:
    """Write config.json + diffusion_pytorch_model.safetensors (fp32 unless params are otherwise) to `directory`.

    The result loads with `diffusers.ControlNetModel.from_pretrained(directory)`.
    """
    state = controlnet_to_torch(params, config)
    os.makedirs(directory, exist_ok=True)
    cfg = {"_class_name": "ControlNetModel", "_diffusers_version": diffusers_version(),
           **controlnet_config_to_diffusers(config)}
    cfg[LAYOUT_ENCODING_KEY] = config.layout_encoding
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_pretrained_controlnet(
    directory: str, layout_encoding: Optional[str] = None, dtype: Optional[Any] = None, **flax_options
) -> Tuple[ControlNetConfig, Dict[str, Any]]:
    """A diffusers ControlNetModel directory (config.json + diffusion_pytorch_model.safetensors) -> (config, params)."""
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = controlnet_config_from_diffusers(json.load(f), layout_encoding=layout_encoding, **flax_options)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (only safetensors weights are read)")
    return config, controlnet_from_torch(safetensors.numpy.load_file(path), config, dtype=dtype)


# ---------------------------------------------------------------------------
# Class-embedding recipe for PyTorch users (the README text: templates/class_embedding_recipe.md).


def write_class_embedding_recipe(
    out_dir: str,
    table: Any,
    class_names: Sequence[str],
    ignore_id: Optional[int],
    source: str = "e.g. the text encoder's embedding of \"A photo of {class}\"",
) -> Dict[str, str]:
    """Write the per-class vectors (safetensors), class_names.json and a README.md recipe to `out_dir`.

    table: [N, D] (written as float32); class_names: N names, id order;
    ignore_id: the id that maps to the zero vector (None: none). `source`
    describes how the vectors were made (goes into the README). Returns the
    paths written, by kind.
    """
    table = np.asarray(to_numpy(table), dtype=np.float32)
    if table.ndim != 2:
        raise ValueError(f"table must be [N, D], got shape {table.shape}")
    names = [str(n) for n in class_names]
    if len(names) != table.shape[0]:
        raise ValueError(f"{len(names)} class names for a table of {table.shape[0]} rows")
    if ignore_id is not None and not isinstance(ignore_id, (int, np.integer)):
        raise ValueError(f"ignore_id must be an int or None, got {ignore_id!r}")
    os.makedirs(out_dir, exist_ok=True)
    n, d = table.shape
    paths = {
        "weights": os.path.join(out_dir, CLASS_EMBEDDINGS_NAME),
        "class_names": os.path.join(out_dir, "class_names.json"),
        "readme": os.path.join(out_dir, "README.md"),
    }
    metadata = {
        "class_names": json.dumps(names),
        "ignore_id": json.dumps(None if ignore_id is None else int(ignore_id)),
        "downsample": str(HINT_IMAGE_DOWNSAMPLE["class_embedding"]),
        "resize": "nearest: out[i, j] = labels[4 i, 4 j]",
    }
    safetensors.numpy.save_file({CLASS_EMBEDDINGS_KEY: np.ascontiguousarray(table)}, paths["weights"], metadata=metadata)
    with open(paths["class_names"], "w") as f:
        json.dump(names, f, indent=1)
    readme = templates.fill(
        "class_embedding_recipe.md",
        weights=CLASS_EMBEDDINGS_NAME,
        key=CLASS_EMBEDDINGS_KEY,
        n=n,
        d=d,
        source=source,
        ignore_sentence="There is no ignore id." if ignore_id is None
        else f"Id {int(ignore_id)} is the ignore/unlabelled id and maps to the zero vector.",
        ignore_literal="None" if ignore_id is None else int(ignore_id),
    )
    with open(paths["readme"], "w") as f:
        f.write(readme)
    return paths


__all__ = [
    "CONTROLNET_SEQUENCE_NAMES",
    "ConversionError",
    "LAYOUT_ENCODING_KEY",
    "controlnet_config_from_diffusers",
    "controlnet_config_to_diffusers",
    "controlnet_from_torch",
    "controlnet_param_shapes",
    "controlnet_to_torch",
    "load_pretrained_controlnet",
    "save_pretrained_controlnet",
    "write_class_embedding_recipe",
]
