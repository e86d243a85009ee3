"""diffusers UNet2DConditionModel state dict <-> sdsup UNet2DConditionModel params."""

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.convert.torch_layout import Path, params_from_torch, params_to_torch, shapes_of
from sdsup.models.unet import UNet2DConditionModel, UNetConfig

# diffusers ModuleLists (and Sequentials) in the UNet: `resnets.1` <-> `resnets_1`.
UNET_SEQUENCE_NAMES = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers", "to_out", "net"}
)


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
