"""diffusers UNet2DConditionModel <-> sdsup UNet2DConditionModel: config dicts and state dicts."""

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.convert.torch_layout import (FLAX_OPTIONS, Path, params_from_torch, params_to_torch, pytorch_config_fields,
                                        shapes_of)
from sdsup.models.unet import UNet2DConditionModel, UNetConfig

# diffusers ModuleLists (and Sequentials) in the UNet: `resnets.1` <-> `resnets_1`.
UNET_SEQUENCE_NAMES = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers", "to_out", "net"}
)

# UNetConfig fields diffusers has no key for: set by the caller, never read from a diffusers config.

# diffusers config keys the sdsup UNet does not implement, with the only value
# it accepts for each (the diffusers default). Anything else is refused
# rather than silently ignored.
_UNSUPPORTED_DIFFUSERS_KEYS: Dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dropout": 0.0,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Only meaningful together with an addition embedding, which is refused above.
_IGNORED_DIFFUSERS_KEYS = ("addition_embed_type_num_heads",)


def unet_config_from_diffusers(config: Mapping[str, Any], **flax_options) -> UNetConfig:
    """A diffusers UNet2DConditionModel config dict (e.g. a parsed config.json) as a UNetConfig.

    Keys starting with "_" are metadata and skipped; a feature this UNet
    does not implement raises ValueError naming the key. `flax_options`
    sets the Flax-only fields (dtype, param_dtype, remat, attention_impl).
    """
    own = {f.name for f in dataclasses.fields(UNetConfig)}
    flax_only = set(FLAX_OPTIONS)
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in _IGNORED_DIFFUSERS_KEYS:
            continue
        if key in _UNSUPPORTED_DIFFUSERS_KEYS:
            if value != _UNSUPPORTED_DIFFUSERS_KEYS[key]:
                raise ValueError(
                    f"diffusers UNet config {key}={value!r} is not supported "
                    f"(only {_UNSUPPORTED_DIFFUSERS_KEYS[key]!r})"
                )
            continue
        if key not in own or key in flax_only:
            raise ValueError(f"unknown diffusers UNet config key {key!r}")
        kwargs[key] = value
    unknown = set(flax_options) - flax_only
    if unknown:
        raise ValueError(f"unknown Flax options {sorted(unknown)}; allowed: {sorted(flax_only)}")
    return UNetConfig(**kwargs, **flax_options)


def unet_config_to_diffusers(config: UNetConfig) -> Dict[str, Any]:
    """Config dict that diffusers' UNet2DConditionModel(**cfg) accepts."""
    return pytorch_config_fields(config)


@functools.lru_cache(maxsize=16)
def unet_param_shapes(config: UNetConfig) -> Dict[Path, Tuple[int, ...]]:
    """Flat Flax parameter shapes of the UNet `config` describes (abstract: nothing is allocated)."""
    model = UNet2DConditionModel(config)
    size = 2 ** (len(config.block_out_channels) - 1)
    abstract = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, size, size, config.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, config.cross_attention_dim)),
    )
    return shapes_of(nn.meta.unbox(abstract["params"]))


def unet_from_torch(state_dict: Mapping[str, Any], config: UNetConfig, dtype: Optional[Any] = None) -> Dict[str, Any]:
    """diffusers UNet2DConditionModel state dict (torch tensors or numpy arrays) -> Flax params.

    Every key must be present with its exact shape; otherwise ConversionError
    lists the missing, unexpected and mis-shaped keys.
    """
    return params_from_torch(state_dict, unet_param_shapes(config), UNET_SEQUENCE_NAMES, model="UNet", dtype=dtype)


def unet_to_torch(params: Mapping[str, Any], config: UNetConfig) -> Dict[str, np.ndarray]:
    """Flax UNet params (unboxed; a {'params': ...} wrapper is accepted) -> diffusers state dict of numpy arrays."""
    if set(params) == {"params"}:
        params = params["params"]
    return params_to_torch(nn.meta.unbox(params), unet_param_shapes(config), UNET_SEQUENCE_NAMES, model="UNet")
