"""diffusers ControlNetModel state dict <-> sdsup ControlNetModel params, export and class-embedding recipe.

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

from sdsup.convert.torch_layout import ConversionError, Path, params_from_torch, params_to_torch, shapes_of, to_numpy
from sdsup.convert.unet import UNET_SEQUENCE_NAMES
from sdsup.models.controlnet import (
    HINT_IMAGE_DOWNSAMPLE,
    LAYOUT_ENCODING_KEY,
    ControlNetConfig,
    ControlNetModel,
    dummy_inputs,
)

CONTROLNET_SEQUENCE_NAMES = UNET_SEQUENCE_NAMES | {"controlnet_down_blocks", "blocks"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_EMBEDDINGS_NAME = "class_embeddings.safetensors"
CLASS_EMBEDDINGS_KEY = "class_embeddings"


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


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers not installed: any released version string works
        return "0.27.0"


def save_pretrained_controlnet(directory: str, params: Mapping[str, Any], config: ControlNetConfig) -> str:
    """Write config.json + diffusion_pytorch_model.safetensors (fp32 unless params are otherwise) to `directory`.

    The result loads with `diffusers.ControlNetModel.from_pretrained(directory)`.
    """
    import safetensors.numpy

    state = controlnet_to_torch(params, config)
    os.makedirs(directory, exist_ok=True)
    cfg = {"_class_name": "ControlNetModel", "_diffusers_version": _diffusers_version(), **config.to_diffusers()}
    cfg[LAYOUT_ENCODING_KEY] = config.layout_encoding
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_pretrained_controlnet(
    directory: str, layout_encoding: Optional[str] = None, dtype: Optional[Any] = None, **flax_options
) -> Tuple[ControlNetConfig, Dict[str, Any]]:
    """A diffusers ControlNetModel directory (config.json + diffusion_pytorch_model.safetensors) -> (config, params)."""
    import safetensors.numpy

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = ControlNetConfig.from_diffusers(json.load(f), layout_encoding=layout_encoding, **flax_options)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (only safetensors weights are read)")
    return config, controlnet_from_torch(safetensors.numpy.load_file(path), config, dtype=dtype)


# ---------------------------------------------------------------------------
# Class-embedding recipe for PyTorch users.

_RECIPE = '''# Class-embedding layout conditioning (sdsup "class_embedding" ControlNet)

`{weights}` holds `{key}`: a float32 [{n}, {d}] table, row `k` = the vector of
class `k` ({source}). Class names, in id order, are in `class_names.json` (and
in the safetensors metadata). {ignore_sentence} Any id outside [0, {n})
maps to the zero vector.

To build `controlnet_cond` from a label map `labels` ([B, H, W] int64 class ids,
H and W divisible by 4): take the label at (4i, 4j) for every output pixel
(i, j) -- PyTorch's `F.interpolate(..., mode="nearest")` to (H/4, W/4), which is
`labels[:, ::4, ::4]`; NOT "nearest-exact", which would sample (4i+2, 4j+2) --
look each id up in the table, and put channels first as diffusers expects
(ids pass through float32 for `F.interpolate`, exact below 2**24):

```python
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

IGNORE_ID = {ignore_literal}


def layout_to_controlnet_cond(labels: torch.Tensor, directory: str = ".") -> torch.Tensor:
    """[B, H, W] int class ids -> [B, {d}, H/4, W/4] float32 controlnet_cond."""
    table = load_file(f"{{directory}}/{weights}")["{key}"]
    b, h, w = labels.shape
    assert h % 4 == 0 and w % 4 == 0, "H and W must be divisible by 4"
    ids = F.interpolate(labels[:, None].float(), size=(h // 4, w // 4), mode="nearest")[:, 0].long()
    valid = (ids >= 0) & (ids < table.shape[0])
    if IGNORE_ID is not None:
        valid &= ids != IGNORE_ID
    emb = table[ids.clamp(0, table.shape[0] - 1)]                      # [B, H/4, W/4, {d}]
    emb = torch.where(valid[..., None], emb, torch.zeros((), dtype=emb.dtype))
    return emb.permute(0, 3, 1, 2).contiguous()                         # [B, {d}, H/4, W/4]
```

Then, with the exported `ControlNetModel` (conditioning_channels={d}, one
stride-2 conv in its hint encoder, so the hint is 2x the latent size):

```python
down, mid = controlnet(latents, t, encoder_hidden_states=text_emb,
                       controlnet_cond=layout_to_controlnet_cond(labels), return_dict=False)
noise_pred = unet(latents, t, encoder_hidden_states=text_emb,
                  down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
```

Note: `StableDiffusionControlNetPipeline` resizes its `image=` argument to the
output resolution, so this 1/4-resolution, {d}-channel hint cannot go through
`image=` unchanged; call the ControlNet in your own denoising loop (as above) or
override the pipeline's `prepare_image` to pass the tensor through.
'''


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
    import safetensors.numpy

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
    readme = _RECIPE.format(
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
    "controlnet_from_torch",
    "controlnet_param_shapes",
    "controlnet_to_torch",
    "load_pretrained_controlnet",
    "save_pretrained_controlnet",
    "write_class_embedding_recipe",
]
