"""diffusers AutoencoderKL state dict <-> sdsup AutoencoderKL params.

Exported keys are diffusers' current names (mid-block attention
`to_q/to_k/to_v/to_out.0`). On import the legacy names of old SD checkpoints
(`query/key/value/proj_attn`) are also accepted for the mid-block attention,
renamed as diffusers' `ModelMixin._fix_state_dict_keys_on_load` does; a
checkpoint holding both spellings of one weight is refused.
"""

import functools
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.convert.torch_layout import (
    ConversionError,
    Path,
    params_from_torch,
    params_to_torch,
    shapes_of,
    torch_key,
    torch_shape,
)
from sdsup.models.vae import AutoencoderKL, VAEConfig

# diffusers ModuleLists in the autoencoder: `resnets.1` <-> `resnets_1`.
VAE_SEQUENCE_NAMES = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out"}
)

# Legacy (diffusers < 0.14 AttentionBlock) names of the mid-block attention weights.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


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
