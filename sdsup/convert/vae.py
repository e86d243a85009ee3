"""diffusers AutoencoderKL <-> sdsup AutoencoderKL: config dicts and state dicts.

Exported keys are diffusers' current names (mid-block attention
`to_q/to_k/to_v/to_out.0`). On import the legacy names of old SD checkpoints
(`query/key/value/proj_attn`) are also accepted for the mid-block attention,
renamed as diffusers' `ModelMixin._fix_state_dict_keys_on_load` does; a
checkpoint holding both spellings of one weight is refused.
"""

import dataclasses
import functools
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.convert.torch_layout import (
    FLAX_OPTIONS,
    ConversionError,
    Path,
    params_from_torch,
    params_to_torch,
    pytorch_config_fields,
    shapes_of,
    torch_key,
    torch_shape,
)
from sdsup.models.vae import AutoencoderKL, VAEConfig

# diffusers ModuleLists in the autoencoder: `resnets.1` <-> `resnets_1`.
VAE_SEQUENCE_NAMES = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out"}
)

# The only block types of diffusers' AutoencoderKL that sdsup's VAE has.
DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
# VAEConfig fields diffusers has no key for: set by the caller, never read from a diffusers config.
# diffusers AutoencoderKL config keys that are not fields of VAEConfig, with
# the only value accepted (the diffusers default). Block types are checked
# separately (they must be one type per entry of block_out_channels).
_FIXED_DIFFUSERS_KEYS: Dict[str, Any] = {"act_fn": "silu"}
# diffusers' defaults where they differ from VAEConfig's (SD 1.5) ones: a
# diffusers config without these keys means these values.
_DIFFUSERS_DEFAULTS: Dict[str, Any] = {"block_out_channels": (64,), "layers_per_block": 1, "sample_size": 32}

# Legacy (diffusers < 0.14 AttentionBlock) names of the mid-block attention weights.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def vae_config_from_diffusers(config: Mapping[str, Any], **flax_options) -> VAEConfig:
    """A diffusers AutoencoderKL config dict (e.g. a parsed vae/config.json) as a VAEConfig.

    Keys starting with "_" are metadata and skipped; absent keys take
    diffusers' defaults (not VAEConfig's SD-1.5 ones). Block types other
    than DownEncoderBlock2D / UpDecoderBlock2D, act_fn other than silu and
    unknown keys raise ValueError naming the key. `flax_options` sets the
    Flax-only fields (dtype, param_dtype, remat, attention_impl).
    """
    own = {f.name for f in dataclasses.fields(VAEConfig)} - set(FLAX_OPTIONS)
    kwargs: Dict[str, Any] = {}
    block_types = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in _FIXED_DIFFUSERS_KEYS:
            if value != _FIXED_DIFFUSERS_KEYS[key]:
                raise ValueError(
                    f"diffusers AutoencoderKL config {key}={value!r} is not supported "
                    f"(only {_FIXED_DIFFUSERS_KEYS[key]!r})"
                )
            continue
        if key in ("down_block_types", "up_block_types"):
            block_types[key] = tuple(value)
            continue
        if key not in own:
            raise ValueError(f"unknown or unsupported diffusers AutoencoderKL config key {key!r}")
        kwargs[key] = value
    unknown = set(flax_options) - set(FLAX_OPTIONS)
    if unknown:
        raise ValueError(f"unknown Flax options {sorted(unknown)}; allowed: {sorted(FLAX_OPTIONS)}")
    for key, value in _DIFFUSERS_DEFAULTS.items():
        kwargs.setdefault(key, value)
    out = VAEConfig(**kwargs, **flax_options)
    for key, want in (("down_block_types", DOWN_BLOCK_TYPE), ("up_block_types", UP_BLOCK_TYPE)):
        types = block_types.get(key, (want,) * out.num_levels)
        if any(t != want for t in types):
            raise ValueError(f"diffusers AutoencoderKL config {key}={list(types)} is not supported (only {want!r})")
        if len(types) != out.num_levels:
            raise ValueError(
                f"{key} has {len(types)} entries but block_out_channels {out.block_out_channels} has {out.num_levels}"
            )
    return out


def vae_config_to_diffusers(config: VAEConfig) -> Dict[str, Any]:
    """Config dict that diffusers' AutoencoderKL(**cfg) accepts (and config.json can hold)."""
    out: Dict[str, Any] = {
        "down_block_types": [DOWN_BLOCK_TYPE] * config.num_levels,
        "up_block_types": [UP_BLOCK_TYPE] * config.num_levels,
        "act_fn": "silu",
    }
    out.update(pytorch_config_fields(config))
    return out


@functools.lru_cache(maxsize=16)
def vae_param_shapes(config: VAEConfig) -> Dict[Path, Tuple[int, ...]]:
    """Flat Flax parameter shapes of the VAE `config` describes (abstract: nothing is allocated)."""
    model = AutoencoderKL(config)
    size = config.downsample_factor
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, config.in_channels)))
    return shapes_of(nn.meta.unbox(abstract["params"]))


def vae_torch_shapes(config: VAEConfig) -> Dict[str, Tuple[int, ...]]:
    """diffusers state-dict key -> PyTorch shape, for the VAE `config` describes."""
    return {
        torch_key(path, VAE_SEQUENCE_NAMES): torch_shape(path[-1], shape)
        for path, shape in vae_param_shapes(config).items()
    }


def rename_legacy_attention_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Mid-block attention `query/key/value/proj_attn` -> `to_q/to_k/to_v/to_out.0`; other keys unchanged.

    Raises ConversionError if a legacy key and its current name are both present.
    """
    out: Dict[str, Any] = {}
    renamed = []
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        if match:
            prefix, old, leaf = match.groups()
            new = f"{prefix}.{_LEGACY_ATTENTION[old]}.{leaf}"
            if new in state_dict:
                raise ConversionError(f"VAE state dict holds both {key!r} and its current name {new!r}")
            renamed.append((new, value))
        else:
            out[key] = value
    out.update(renamed)
    return out


def vae_from_torch(
    state_dict: Mapping[str, Any], config: VAEConfig, dtype: Optional[Any] = None
) -> Dict[str, Any]:
    """diffusers AutoencoderKL state dict (torch tensors or numpy arrays) -> Flax params (the bare tree).

    Legacy attention names are accepted (see the module docstring). Every key
    must be present with its exact shape; otherwise ConversionError lists the
    missing, unexpected and mis-shaped keys.
    """
    state_dict = rename_legacy_attention_keys(state_dict)
    return params_from_torch(state_dict, vae_param_shapes(config), VAE_SEQUENCE_NAMES, model="VAE", dtype=dtype)


def vae_to_torch(params: Mapping[str, Any], config: VAEConfig) -> Dict[str, np.ndarray]:
    """Flax VAE params (boxed or not; a {'params': ...} wrapper is accepted) -> diffusers state dict of numpy arrays."""
    if set(params) == {"params"}:
        params = params["params"]
    return params_to_torch(nn.meta.unbox(params), vae_param_shapes(config), VAE_SEQUENCE_NAMES, model="VAE")
