"""Convert CLIP text-encoder weights between transformers (PyTorch) and sdsup Flax.

Key names. Every published CLIP text checkpoint (openai/clip-vit-*, the
`text_encoder` of Stable Diffusion pipelines) and transformers < 5 store
`text_model.`-prefixed keys (`text_model.embeddings.token_embedding.weight`,
...). transformers 5 removed the wrapper, so `CLIPTextModel().state_dict()`
has no prefix, but its `from_pretrained` still accepts the prefixed form.
Hence: export writes the prefixed form by default (loads in every version,
and is the layout of `CLIPTextModelWithProjection`), `prefix=""` gives the
transformers-5 `state_dict` form for `load_state_dict(strict=True)`; import
detects either.

Old checkpoints also carry the `embeddings.position_ids` buffer (persistent
before transformers 4.31). It holds no learned value (arange) and current
transformers discards it, so import accepts and drops it; export omits it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Type, TypeVar

import flax.linen as nn
import numpy as np

from sdsup.models.clip_text import CLIPTextConfig

PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"
_POSITION_IDS = "embeddings.position_ids"

_Config = TypeVar("_Config")


# ---------------------------------------------------------------------------
# Configs.


def tower_config_from_transformers(cls: Type[_Config], config: Any, tower: str) -> _Config:
    """One CLIP tower's config (`cls`) from a transformers config object or dict (config.json).

    `tower` is the key a full CLIPConfig keeps it under ("text_config",
    "vision_config"); such a config contributes that entry, and its
    top-level projection_dim wins, as in CLIPModel. Keys that do not affect
    the forward pass (initializer_range, dtype, architectures, ...) are
    ignored.
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if tower in d:
        sub = dict(d[tower] or {})
        if "projection_dim" in d:
            sub["projection_dim"] = d["projection_dim"]
        d = sub
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def clip_text_config_from_transformers(config: Any) -> CLIPTextConfig:
    """From a transformers CLIPTextConfig / CLIPConfig or their dicts (config.json)."""
    return tower_config_from_transformers(CLIPTextConfig, config, "text_config")


def clip_text_config_to_transformers(config: CLIPTextConfig) -> dict:
    """Keyword arguments for `transformers.CLIPTextConfig(**d)`."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------
# State dicts.

# kind: how a torch tensor maps to its Flax leaf.
#   "dense":  torch Linear weight (out, in)  <-> Flax Dense kernel (in, out)
#   "copy":   same array both sides (biases, layer norms, embeddings)
_DENSE, _COPY = "dense", "copy"


def _entries(config: CLIPTextConfig) -> Iterator[Tuple[str, Tuple[str, ...], str]]:
    """(torch key without prefix, Flax path inside CLIPTextTransformer, kind)."""
    yield "embeddings.token_embedding.weight", ("embeddings", "token_embedding", "embedding"), _COPY
    yield "embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), _COPY
    for i in range(config.num_hidden_layers):
        t, f = f"encoder.layers.{i}.", ("encoder", f"layers_{i}")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield t + f"self_attn.{proj}.weight", f + ("self_attn", proj, "kernel"), _DENSE
            yield t + f"self_attn.{proj}.bias", f + ("self_attn", proj, "bias"), _COPY
        for fc in ("fc1", "fc2"):
            yield t + f"mlp.{fc}.weight", f + ("mlp", fc, "kernel"), _DENSE
            yield t + f"mlp.{fc}.bias", f + ("mlp", fc, "bias"), _COPY
        for ln in ("layer_norm1", "layer_norm2"):
            yield t + f"{ln}.weight", f + (ln, "scale"), _COPY
            yield t + f"{ln}.bias", f + (ln, "bias"), _COPY
    yield "final_layer_norm.weight", ("final_layer_norm", "scale"), _COPY
    yield "final_layer_norm.bias", ("final_layer_norm", "bias"), _COPY


def _torch_shape(key: str, config: CLIPTextConfig) -> Tuple[int, ...]:
    """Expected PyTorch shape of `key` (unprefixed)."""
    d, ff = config.hidden_size, config.intermediate_size
    if key == "embeddings.token_embedding.weight":
        return (config.vocab_size, d)
    if key == "embeddings.position_embedding.weight":
        return (config.max_position_embeddings, d)
    if key == PROJECTION_KEY:
        return (config.projection_dim, d)
    if key.endswith("fc1.weight"):
        return (ff, d)
    if key.endswith("fc1.bias"):
        return (ff,)
    if key.endswith("fc2.weight"):
        return (d, ff)
    if key.endswith(".weight") and "_proj" in key:
        return (d, d)
    return (d,)  # biases of d-wide layers, layer-norm scale/bias


def _to_flax_leaf(array: np.ndarray, kind: str) -> np.ndarray:
    # Copy so the returned tree never aliases caller (e.g. torch) storage.
    return np.array(array.T if kind == _DENSE else array, copy=True, order="C")


def _set(tree: Dict[str, Any], path: Tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: Tuple[str, ...], where: str):
    node = tree
    for depth, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            raise KeyError(f"Flax params lack {'/'.join(path[: depth + 1])} (needed for {where})")
        node = node[name]
    return node


def _flax_paths(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[str, ...]]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flax_paths(value, prefix + (name,))
        else:
            yield prefix + (name,)


def _detect_prefix(keys) -> str:
    if PREFIX + "embeddings.token_embedding.weight" in keys:
        return PREFIX
    if "embeddings.token_embedding.weight" in keys:
        return ""
    raise KeyError(
        "missing key 'text_model.embeddings.token_embedding.weight' (or unprefixed "
        "'embeddings.token_embedding.weight'): not a CLIP text-encoder state dict"
    )


def clip_text_from_torch(
    state_dict: Mapping[str, Any],
    config: CLIPTextConfig,
    *,
    with_projection: bool = False,
    prefix: Optional[str] = None,
) -> Dict[str, Any]:
    """transformers CLIPTextModel(/WithProjection) state dict -> Flax variables.

    `state_dict` values are anything `np.asarray` accepts (numpy arrays,
    safetensors numpy loads, CPU torch tensors of numpy-supported dtypes).
    Dtypes are kept. Returns `{"params": tree}` of host numpy arrays, for
    `CLIPTextTransformer` (or `CLIPTextModelWithProjection` with
    `with_projection=True`). `prefix=None` detects `text_model.` or no prefix.

    Raises KeyError naming every missing or unexpected key, ValueError naming
    the first key whose shape does not match `config`.
    """
    keys = set(state_dict)
    if prefix is None:
        prefix = _detect_prefix(keys)

    expected = {prefix + k: (k, path, kind) for k, path, kind in _entries(config)}
    if with_projection:
        expected[PROJECTION_KEY] = (PROJECTION_KEY, ("text_projection", "kernel"), _DENSE)
    optional = {prefix + _POSITION_IDS}

    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected) - optional)
    if missing or unexpected:
        hint = ""
        if PROJECTION_KEY in unexpected:
            hint = " (the state dict has a text projection: pass with_projection=True)"
        raise KeyError(f"CLIP text state dict mismatch: missing keys {missing}, unexpected keys {unexpected}{hint}")

    pos_key = prefix + _POSITION_IDS
    if pos_key in keys:
        n = np.asarray(state_dict[pos_key]).size
        if n != config.max_position_embeddings:
            raise ValueError(
                f"{pos_key} has {n} entries, config.max_position_embeddings={config.max_position_embeddings}"
            )

    text: Dict[str, Any] = {}
    projection = None
    for key, (bare, path, kind) in expected.items():
        array = np.asarray(state_dict[key])
        want = _torch_shape(bare, config)
        if array.shape != want:
            raise ValueError(f"{key}: shape {array.shape}, expected {want} for this config")
        if bare == PROJECTION_KEY:
            projection = {"kernel": _to_flax_leaf(array, kind)}
        else:
            _set(text, path, _to_flax_leaf(array, kind))

    if with_projection:
        return {"params": {"text_model": text, "text_projection": projection}}
    return {"params": text}


def clip_text_to_torch(
    params: Mapping[str, Any],
    config: CLIPTextConfig,
    *,
    with_projection: bool = False,
    prefix: str = PREFIX,
) -> Dict[str, np.ndarray]:
    """Flax params -> transformers state dict of C-contiguous numpy arrays.

    `params` may be boxed (straight from `model.init`) or not, with or without
    the top-level `"params"` collection. Every Flax leaf must be consumed:
    extra or missing leaves raise KeyError naming them, wrong shapes raise
    ValueError. The result can be written with `safetensors.numpy.save_file`
    next to `transformers.CLIPTextConfig(**clip_text_config_to_transformers(config))`.
    """
    tree = nn.meta.unbox(params)
    if set(tree) == {"params"}:
        tree = tree["params"]

    if with_projection:
        text = _get(tree, ("text_model",), "the text tower of CLIPTextModelWithProjection")
        extra = sorted(set(tree) - {"text_model", "text_projection"})
        if extra:
            raise KeyError(f"unexpected Flax params {extra} in CLIPTextModelWithProjection")
    else:
        text = tree

    out: Dict[str, np.ndarray] = {}
    used = set()
    for bare, path, kind in _entries(config):
        value = np.asarray(_get(text, path, prefix + bare))
        value = np.ascontiguousarray(value.T if kind == _DENSE else value)
        want = _torch_shape(bare, config)
        if value.shape != want:
            raise ValueError(f"{'/'.join(path)} -> {prefix + bare}: shape {value.shape}, expected {want}")
        out[prefix + bare] = value
        used.add(path)

    unused = sorted("/".join(p) for p in _flax_paths(text) if p not in used)
    if unused:
        raise KeyError(f"unexpected Flax params not in a CLIPTextModel: {unused}")

    if with_projection:
        kernel = np.asarray(_get(tree, ("text_projection", "kernel"), PROJECTION_KEY))
        extra = sorted(set(tree["text_projection"]) - {"kernel"})
        if extra:
            raise KeyError(f"unexpected Flax params text_projection/{extra} (the projection has no bias)")
        value = np.ascontiguousarray(kernel.T)
        if value.shape != _torch_shape(PROJECTION_KEY, config):
            raise ValueError(
                f"text_projection/kernel -> {PROJECTION_KEY}: shape {value.shape}, "
                f"expected {_torch_shape(PROJECTION_KEY, config)}"
            )
        out[PROJECTION_KEY] = value
    return out
