"""diffusers / transformers weight files: safetensors only, never pickle.

Reading: a component directory holds `{base}.safetensors`, or the shards its
`{base}.safetensors.index.json` names, optionally as a `variant` such as
fp16 (`{base}.fp16.safetensors`); `base` is `diffusion_pytorch_model` for
diffusers models and `model` for transformers ones. A directory with only
pickle files (.bin, .ckpt, .pt, .pth, ...) is refused, never unpickled.
Writing: state dicts as safetensors marked `format: pt`, as PyTorch libraries
write them.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import safetensors.numpy

from sdsup.convert.pipeline_files import PipelineConvertError, one_line, read_json

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def weight_files(directory: str, base: str, variant: Optional[str]) -> List[str]:
    """The safetensors files holding a component's weights (one, or the shards of an index).

    With a `variant` (e.g. "fp16"), `{base}.{variant}.safetensors` (or its index); a component
    without that variant falls back to the plain file, as diffusers does.
    """
    if variant:
        stem = f"{base}.{variant}"
        if os.path.isfile(os.path.join(directory, stem + ".safetensors")) or os.path.isfile(
                os.path.join(directory, stem + ".safetensors.index.json")):
            return weight_files(directory, stem, None)
    stem = base
    single = os.path.join(directory, stem + ".safetensors")
    if os.path.isfile(single):
        return [single]
    index = single + ".index.json"
    if os.path.isfile(index):
        meta = read_json(index, f"sharded weights of {directory}")
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PipelineConvertError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise PipelineConvertError(f"{index} names shards that are missing: {missing}")
        return [os.path.join(directory, s) for s in shards]
    present = sorted(os.listdir(directory))
    pickles = [f for f in present if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PipelineConvertError(
            f"{directory} has only pickle weights ({', '.join(pickles)}); sdsup reads safetensors only and never "
            f"unpickles files. Re-save the component with safetensors (e.g. diffusers/transformers "
            f"`save_pretrained(..., safe_serialization=True)` in an environment you trust)")
    others = [f for f in present if f.endswith(".safetensors")]
    hint = f" (found {', '.join(others)}; pass --variant for a variant such as fp16)" if others else ""
    wanted = f"{base}.{variant}.safetensors nor {stem}.safetensors" if variant else f"{stem}.safetensors"
    raise PipelineConvertError(f"{directory} has no {wanted}{hint}")


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """A safetensors file as numpy arrays (bfloat16 ones as ml_dtypes arrays)."""
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:
        first = e
    # numpy has no bfloat16: read such files through safetensors' flax loader (ml_dtypes arrays).
    try:
        from safetensors.flax import load_file as load_flax  # deferred: imports jax; only bfloat16 files need it

        return {k: np.asarray(v) for k, v in load_flax(path).items()}
    except Exception:
        pass
    raise PipelineConvertError(f"cannot read {path}: {type(first).__name__}: {one_line(first)}") from first


def read_state_dict(
    directory: str, base: str, variant: Optional[str] = None
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """(state dict of numpy arrays, files read) of a component directory; safetensors only."""
    files = weight_files(directory, base, variant)
    state: Dict[str, np.ndarray] = {}
    for path in files:
        for key, value in load_safetensors(path).items():
            if key in state:
                raise PipelineConvertError(f"{path}: tensor {key!r} appears in two shards")
            state[key] = value
    return state, files


def cast_floating(state: Dict[str, np.ndarray], dtype: Optional[Any]) -> Dict[str, np.ndarray]:
    """`state` with its floating arrays (bfloat16 included) cast to `dtype`; None keeps every dtype."""
    if dtype is None:
        return state
    want = np.dtype(dtype)
    return {k: (v.astype(want) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v)
            for k, v in state.items()}


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """A PyTorch-named state dict of numpy arrays as a safetensors file that PyTorch libraries load."""
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path,
                                metadata={"format": "pt"})
