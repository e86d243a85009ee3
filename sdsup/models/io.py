"""sdsup model files: one directory per model, `config.json` + `params.safetensors`.

This is what a finished stage leaves for the next one, what
`python -m sdsup.convert import` writes from a diffusers directory, and what
`python -m sdsup.convert export` reads. Parameters are stored flat, keys
joined with "/", exactly as Flax names them; safetensors only, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Tuple

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from sdsup.errors import SdsupError
from sdsup.models import (clip_text, clip_vision, controlnet, drn, inception, layout, planner, segformer, segmenter, unet,
                          vae)

CONFIG_FILE, PARAMS_FILE = "config.json", "params.safetensors"


class ModelFileError(SdsupError):
    pass


# Model kind (the "kind" entry of config.json) -> its config class.
CONFIG_CLASSES: Dict[str, Any] = {
    "unet": unet.UNetConfig,
    "vae": vae.VAEConfig,
    "controlnet": controlnet.ControlNetConfig,
    "text_encoder": clip_text.CLIPTextConfig,
    "image_encoder": clip_vision.CLIPVisionConfig,  # CLIP vision tower (+ projection), e.g. for CLIP score
    "segmenter": segmenter.SegmenterConfig,
    "drn_segmenter": drn.DRNConfig,  # fyu/drn's DRN-D (Cityscapes' image-mIoU evaluator; sdsup.convert drn)
    "segformer_segmenter": segformer.SegformerConfig,  # transformers' Segformer (evaluator; sdsup.convert segformer)
    "layout": layout.LayoutConfig,
    "planner": planner.PlannerConfig,  # the object planner; its params hold the shape bank too
    "inception": inception.InceptionConfig,  # FID features (sdsup.convert.inception)
}


def kind_of(config: Any) -> str:
    """The model kind whose config class `config` is (a DRNConfig -> "drn_segmenter")."""
    for kind, cls in CONFIG_CLASSES.items():
        if type(config) is cls:
            return kind
    raise ModelFileError(f"{type(config).__name__} is not the config of a known model kind")


def config_to_dict(config: Any) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(config)


def config_from_dict(kind: str, d: dict) -> Any:
    if kind not in CONFIG_CLASSES:
        raise ModelFileError(f"unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in d.items():
        if name not in fields:
            raise ModelFileError(f"{kind} config has an unknown field {name!r}")
        if dataclasses.is_dataclass(fields[name].type) or name == "unet":  # the conditioner embeds a UNet config
            value = unet.UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        elif isinstance(value, list):
            value = tuple(tuple(x) if isinstance(x, list) else x for x in value)
        kwargs[name] = value
    return cls(**kwargs)


def save(directory: str, kind: str, config: Any, params: Any, extra: Dict[str, Any] = None) -> None:
    """Writes a model directory; `params` is the (unboxed) parameter tree."""
    os.makedirs(directory, exist_ok=True)
    flat = traverse_util.flatten_dict(params, sep="/")
    # np.array, not np.ascontiguousarray: the latter turns 0-d leaves (BatchNorm's
    # num_batches_tracked) into shape (1,), which no longer fits the model's variables.
    arrays = {k: np.array(v, order="C") for k, v in flat.items()}
    tmp = os.path.join(directory, PARAMS_FILE + ".tmp")
    save_file(arrays, tmp)
    os.replace(tmp, os.path.join(directory, PARAMS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"kind": kind, "config": config_to_dict(config), **(extra or {})}, f, indent=2)


def load(directory: str) -> Tuple[str, Any, Any, dict]:
    """(kind, config, params, extra) from a model directory, with clear errors."""
    config_path = os.path.join(directory, CONFIG_FILE)
    params_path = os.path.join(directory, PARAMS_FILE)
    for path in (config_path, params_path):
        if not os.path.exists(path):
            raise ModelFileError(f"model directory {directory} has no {os.path.basename(path)}")
    try:
        with open(config_path) as f:
            meta = json.load(f)
        kind = meta.pop("kind")
        config = config_from_dict(kind, meta.pop("config"))
    except ModelFileError:
        raise
    except Exception as e:
        raise ModelFileError(f"{config_path} is not a valid sdsup model config: {type(e).__name__}: {e}") from e
    try:
        flat = load_file(params_path)
    except Exception as e:
        raise ModelFileError(f"{params_path} is unreadable: {type(e).__name__}: {e}") from e
    params = traverse_util.unflatten_dict(flat, sep="/")
    return kind, config, params, meta


def random_like(abstract: Any, seed: int = 0) -> Any:
    """Random host weights with the shapes of an abstract parameter tree (no compile).

    For tests and benchmarks that need a model's weights but not a trained
    one: normalisation scales are ones, biases zeros, everything else
    normal with std 1/sqrt(fan_in), so activations keep their scale.
    Initialising through a jitted `init` would compile the whole model
    (tens of seconds on 2 cores) just to draw random numbers.
    """
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if name == "scale":
            return np.ones(shape, dtype)
        if name == "bias" or len(shape) <= 1:
            return np.zeros(shape, dtype)
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)
