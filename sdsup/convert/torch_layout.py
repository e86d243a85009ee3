"""Generic PyTorch <-> Flax parameter layout helpers, shared by all converters.

Conventions (see `sdsup.models.layers`):

  Flax leaf        shape                 PyTorch leaf   shape
  conv `kernel`    (kh, kw, in, out)     `weight`       (out, in, kh, kw)
  dense `kernel`   (in, out)             `weight`       (out, in)
  norm `scale`     (c,)                  `weight`       (c,)
  `embedding`      (vocab, d)            `weight`       (vocab, d)
  `bias`           (c,)                  `bias`         (c,)

Module names: diffusers' list entries `name.N` are Flax modules `name_N`.
Going from a Flax path to a PyTorch key needs to know which names are lists
(`time_embedding.linear_1` is a literal name, `resnets.1` a list entry), so
converters pass `sequence_names`; the reverse is unambiguous.

A converter describes a model by the flat shapes of its Flax parameters
(e.g. from `jax.eval_shape(model.init, ...)`) and calls `params_from_torch` /
`params_to_torch`, which check every key and shape.
"""

import dataclasses
import re
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

Path = Tuple[str, ...]


class ConversionError(ValueError):
    """A state dict or parameter tree does not match the model it is converted for."""


# ---------------------------------------------------------------------------
# Nested dicts.


# Config fields that only steer the Flax computation (compute dtype, rematerialisation, attention kernel):
# PyTorch configs have no such fields.
FLAX_OPTIONS = ("dtype", "param_dtype", "remat", "attention_impl")


def pytorch_config_fields(config: Any) -> Dict[str, Any]:
    """A config dataclass's fields as a PyTorch config dict: Flax-only options left out, tuples as lists."""
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(config) if f.name not in FLAX_OPTIONS
            for v in (getattr(config, f.name),)}


def flatten(tree: Mapping[str, Any]) -> Dict[Path, Any]:
    """{'a': {'b': x}} -> {('a', 'b'): x}. Leaves are anything that is not a Mapping."""
    out: Dict[Path, Any] = {}

    def visit(prefix: Path, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(prefix + (str(key),), value)
        else:
            out[prefix] = node

    visit((), tree)
    return out


def unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
    """Inverse of `flatten`: {('a', 'b'): x} -> {'a': {'b': x}}."""
    out: Dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConversionError(f"{'/'.join(path)}: {key!r} is both a leaf and a module")
        if path[-1] in node:
            raise ConversionError(f"{'/'.join(path)} given twice")
        node[path[-1]] = value
    return out


# ---------------------------------------------------------------------------
# Array layouts.


def conv_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO."""
    return np.transpose(weight, (2, 3, 1, 0))


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW."""
    return np.transpose(kernel, (3, 2, 0, 1))


def dense_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """(out, in) -> (in, out)."""
    return np.transpose(weight)


def dense_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """(in, out) -> (out, in)."""
    return np.transpose(kernel)


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def leaf_to_torch(name: str, value: np.ndarray) -> Tuple[str, np.ndarray]:
    """A Flax leaf (name, value) -> (PyTorch leaf name, value in PyTorch layout)."""
    if name not in _LEAF_TO_TORCH:
        raise ConversionError(f"no PyTorch equivalent for Flax parameter leaf {name!r}")
    if name == "kernel":
        if value.ndim == 4:
            value = conv_kernel_to_torch(value)
        elif value.ndim == 2:
            value = dense_kernel_to_torch(value)
        else:
            raise ConversionError(f"kernel of rank {value.ndim} is neither a conv nor a dense kernel")
    return _LEAF_TO_TORCH[name], value


def leaf_from_torch(name: str, value: np.ndarray) -> np.ndarray:
    """A PyTorch value -> the Flax layout of leaf `name` (the inverse of `leaf_to_torch`)."""
    if name == "kernel":
        if value.ndim == 4:
            return conv_kernel_from_torch(value)
        if value.ndim == 2:
            return dense_kernel_from_torch(value)
        raise ConversionError(f"kernel of rank {value.ndim} is neither a conv nor a dense kernel")
    return value


def torch_shape(name: str, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The PyTorch shape of a Flax leaf of shape `flax_shape`."""
    if name == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if name == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


# ---------------------------------------------------------------------------
# Names.

_INDEXED = re.compile(r"^(.*)_(\d+)$")


def torch_key(path: Path, sequence_names: Collection[str]) -> str:
    """Flax path -> PyTorch state-dict key.

    ('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'
    when 'down_blocks' and 'resnets' are in `sequence_names`; other names are
    kept as they are (so 'linear_1' stays 'linear_1').
    """
    parts = []
    for name in path[:-1]:
        match = _INDEXED.match(name)
        if match and match.group(1) in sequence_names:
            parts.extend(match.groups())
        else:
            parts.append(name)
    parts.append(_LEAF_TO_TORCH.get(path[-1], path[-1]))
    return ".".join(parts)


def flax_module_path(torch_module_key: str) -> Path:
    """PyTorch module key -> Flax module path: every numeric part joins the name before it.

    'down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2' ->
    ('down_blocks_0', 'attentions_1', 'transformer_blocks_0', 'ff', 'net_2')
    """
    out = []
    for part in torch_module_key.split("."):
        if part.isdigit():
            if not out:
                raise ConversionError(f"{torch_module_key!r} starts with an index")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


# ---------------------------------------------------------------------------
# Whole models.


def to_numpy(value: Any) -> np.ndarray:
    """np.asarray that also takes torch tensors (bfloat16 included) and jax arrays."""
    if hasattr(value, "detach"):  # torch.Tensor without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def params_from_torch(
    state_dict: Mapping[str, Any],
    flax_shapes: Mapping[Path, Tuple[int, ...]],
    sequence_names: Collection[str],
    model: str = "model",
    ignore: Callable[[str], bool] = lambda key: False,
    dtype: Optional[Any] = None,
) -> Dict[str, Any]:
    """PyTorch state dict -> nested Flax params of the model whose flat leaf shapes are `flax_shapes`.

    Raises ConversionError naming every missing, unexpected or wrongly shaped
    key. Keys for which `ignore(key)` is true (buffers such as position ids)
    are skipped. Values keep their dtype unless `dtype` is given.
    """
    expected = {torch_key(path, sequence_names): path for path in flax_shapes}
    if len(expected) != len(flax_shapes):
        raise ConversionError(f"{model}: two Flax parameters map to the same PyTorch key")
    given = {k for k in state_dict if not ignore(k)}
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    flat = {}
    for key in sorted(given & set(expected)):
        path = expected[key]
        value = to_numpy(state_dict[key])
        want = torch_shape(path[-1], tuple(flax_shapes[path]))
        if tuple(value.shape) != want:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, expected {want}")
            continue
        value = leaf_from_torch(path[-1], value)
        flat[path] = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
    if problems:
        raise ConversionError(f"{model} state dict does not match the config: " + "; ".join(problems))
    return unflatten(flat)


def params_to_torch(
    params: Mapping[str, Any],
    flax_shapes: Mapping[Path, Tuple[int, ...]],
    sequence_names: Collection[str],
    model: str = "model",
) -> Dict[str, np.ndarray]:
    """Nested Flax params (unboxed) -> PyTorch state dict of numpy arrays, checked against `flax_shapes`."""
    flat = flatten(params)
    missing = sorted("/".join(p) for p in set(flax_shapes) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(flax_shapes))
    problems = []
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"unexpected parameters {unexpected}")
    out: Dict[str, np.ndarray] = {}
    for path in sorted(set(flat) & set(flax_shapes)):
        value = to_numpy(flat[path])
        if tuple(value.shape) != tuple(flax_shapes[path]):
            problems.append(f"{'/'.join(path)} has shape {tuple(value.shape)}, expected {tuple(flax_shapes[path])}")
            continue
        _, value = leaf_to_torch(path[-1], value)
        out[torch_key(path, sequence_names)] = np.ascontiguousarray(value)
    if problems:
        raise ConversionError(f"{model} parameters do not match the config: " + "; ".join(problems))
    return out


def shapes_of(tree: Mapping[str, Any]) -> Dict[Path, Tuple[int, ...]]:
    """Flat leaf shapes of a (possibly abstract, e.g. from jax.eval_shape) unboxed parameter tree."""
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


_BN_PARAMS = (("scale", "weight"), ("bias", "bias"))
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"))
_BN_COUNT = "num_batches_tracked"
_INT32_MAX = np.iinfo(np.int32).max


def conv_bn_from_torch(sd: Mapping[str, Any], prefix: str, path: Path, kind: str, flat: Dict[Path, Any],
                       error: Callable[[str], Exception], source: str) -> None:
    """One torch module's weights into `flat` (("params" | "batch_stats",) + path + leaf), for networks built of
    convolutions and BatchNorms (the CSAIL UperNet, DRN): kind "bn" (scale, bias, running statistics and
    num_batches_tracked, 0 when the file has none), "conv" or "conv_bias". Leaves are private float32 copies
    (the count int32); a count that does not fit int32 raises `error`, naming `source`'s key."""
    f32 = lambda key: np.array(to_numpy(sd[f"{prefix}.{key}"]), dtype=np.float32, copy=True)  # noqa: E731
    if kind == "bn":
        for fname, tname in _BN_PARAMS:
            flat[("params",) + path + (fname,)] = f32(tname)
        for fname, tname in _BN_STATS:
            flat[("batch_stats",) + path + (fname,)] = f32(tname)
        count = sd.get(f"{prefix}.{_BN_COUNT}")
        n = 0 if count is None else int(to_numpy(count))
        if not 0 <= n <= _INT32_MAX:
            raise error(f"the {source} state dict's key {prefix}.{_BN_COUNT} = {n} does not fit int32")
        flat[("batch_stats",) + path + (_BN_COUNT,)] = np.array(n, np.int32)
        return
    flat[("params",) + path + ("kernel",)] = np.ascontiguousarray(f32("weight").transpose(2, 3, 1, 0))
    if kind == "conv_bias":
        flat[("params",) + path + ("bias",)] = f32("bias")
