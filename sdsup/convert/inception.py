"""Inception-v3 weights: PyTorch state dict (torchvision key names) <-> sdsup Flax variables.

The file a user supplies for FID is pytorch-fid's release asset
`pt_inception-2015-12-05-6726825d.pth` (about 91 MiB; the `6726825d` is the
start of its SHA-256). pytorch-fid's author ported it from the TensorFlow
Inception graph of 2015-12-05 (`classify_image_graph_def.pb`) that the
original FID code (TTUR, Heusel et al. 2017) used, so FIDs computed with it
are comparable with published ones. It is a plain state dict with
torchvision's key names, for the network `sdsup.models.inception` calls
`variant="fid"` (1008 classes). sdsup never downloads anything: convert the
file once,

  python -m sdsup.convert.inception --torch_weights=pt_inception-2015-12-05-6726825d.pth --out=DIR

and point the FID code at DIR (`sdsup.evaluation.fid.inception_extractor(DIR)`).
A torchvision `inception_v3` checkpoint (`inception_v3_google-*.pth`, 1000
classes) converts the same way as `--variant=torchvision`.

Files are read without unpickling arbitrary objects: `.pth`/`.pt` with
`torch.load(..., weights_only=True)`, `.safetensors` with safetensors. When
the file name carries a torch-hub hash (`name-<hex>.pth`), the file's SHA-256
must start with it, which catches truncated or corrupted downloads.

Key map (the module paths are the same on both sides, "/" against "."):

  flax                                        torch
  params/X/conv/kernel         (kh,kw,i,o)    X.conv.weight          (o,i,kh,kw)
  params/X/bn/{scale,bias}                    X.bn.{weight,bias}
  batch_stats/X/bn/{mean,var}                 X.bn.{running_mean,running_var}
  (not stored: inference only)                X.bn.num_batches_tracked (read: ignored; written: 0)
  params/fc/kernel             (2048,n)       fc.weight              (n,2048)
  params/fc/bias                              fc.bias
  (no auxiliary classifier)                   AuxLogits.*            (read: dropped)

  python -m sdsup.convert.inception --from_model=DIR --torch_out=FILE.safetensors

writes the reverse: a torch state dict (safetensors) that loads with
`load_state_dict(..., strict=True)` into torchvision's
`inception_v3(aux_logits=False, init_weights=False, num_classes=N)` (or
pytorch-fid's FID Inception for the fid variant).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from sdsup.convert.torch_layout import ConversionError, flatten, to_numpy, unflatten
from sdsup.cli import ArgumentParser, run_argparse
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.inception import InceptionConfig, abstract_variables

KIND = "inception"
AUX_PREFIX = "AuxLogits."
_BN_COUNTER = "num_batches_tracked"
# torch hub's rule: the hex run between the last "-" and the extension is a SHA-256 prefix.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.(?:pth|pt|safetensors)$")
# (flax collection, flax leaf) -> torch leaf
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class InceptionConversionError(ConversionError, SdsupError):
    """A weights file or state dict that does not fit the Inception config; the message names the key or file."""


Path = Tuple[str, ...]


@functools.lru_cache(maxsize=None)
def _layout(config: InceptionConfig) -> Dict[str, Tuple[Path, Tuple[int, ...]]]:
    """torch key -> (Flax variable path, collection first, and its Flax shape), in Flax's order."""
    out: Dict[str, Tuple[Path, Tuple[int, ...]]] = {}
    for path, shape in ((p, tuple(v.shape)) for p, v in flatten(abstract_variables(config)).items()):
        leaf = _LEAVES.get((path[0], path[-1]))
        if leaf is None:
            raise AssertionError(f"no torch name for Flax variable {'/'.join(path)}")  # a bug in this file
        out[".".join(path[1:-1] + (leaf,))] = (path, shape)
    return out


def _torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    return tuple(reversed(flax_shape))  # dense kernel; identity on vectors


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    return np.transpose(value)


def expected_torch_keys(config: InceptionConfig) -> Dict[str, Tuple[int, ...]]:
    """Every key `inception_to_torch` writes for `config`, with its torch shape."""
    keys = {}
    for key, (_, shape) in _layout(config).items():
        keys[key] = _torch_shape(shape)
        if key.endswith(".bn.running_var"):
            keys[key[: -len("running_var")] + _BN_COUNTER] = ()
    return keys


def inception_from_torch(state_dict: Mapping[str, Any], config: InceptionConfig,
                         log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """torchvision-named state dict -> unboxed float32 {"params", "batch_stats"} for `InceptionV3(config)`.

    `AuxLogits.*` (the training-only auxiliary classifier) and BatchNorm
    `num_batches_tracked` counters are dropped; any other missing, unexpected
    or wrongly shaped key raises InceptionConversionError naming it.
    """
    layout = _layout(config)
    aux = sorted(k for k in state_dict if k.startswith(AUX_PREFIX))
    counters = {k for k in state_dict if k.endswith("." + _BN_COUNTER)
                and k[: -len(_BN_COUNTER)] + "running_var" in layout}
    given = set(state_dict) - set(aux) - counters
    missing = [k for k in layout if k not in given]
    unexpected = sorted(given - set(layout))
    problems: List[str] = []
    if missing:
        problems.append(f"missing key {missing[0]!r} ({len(missing)} missing: {missing[:6]})")
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected: {unexpected[:6]})")
    flat: Dict[Path, np.ndarray] = {}
    for key, (path, shape) in layout.items():
        if key not in given:
            continue
        value = to_numpy(state_dict[key])
        if tuple(value.shape) != _torch_shape(shape):
            hint = ""
            if key == "fc.weight" and value.ndim == 2 and value.shape[1:] == (shape[0],):
                hint = f" (a {value.shape[0]}-class classifier: convert with num_classes={value.shape[0]})"
            problems.append(f"key {key!r} has shape {tuple(value.shape)}, expected {_torch_shape(shape)}{hint}")
            continue
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            problems.append(f"key {key!r} has dtype {value.dtype}, expected floating point")
            continue
        # A private float32 copy: never a view of a torch tensor that may change later.
        flat[path] = np.array(_from_torch_layout(value), dtype=np.float32, order="C", copy=True)
    if problems:
        raise InceptionConversionError(f"Inception ({config.variant}, {config.num_classes} classes) state dict does "
                                       "not match: " + "; ".join(problems))
    if aux and log:
        log(f"dropped {len(aux)} AuxLogits.* keys (the training-only auxiliary classifier)")
    return unflatten(flat)


def inception_to_torch(variables: Mapping[str, Any], config: InceptionConfig) -> Dict[str, np.ndarray]:
    """Unboxed {"params", "batch_stats"} -> torchvision-named state dict (numpy, float32).

    Loads strictly into torchvision's inception_v3(aux_logits=False,
    num_classes=config.num_classes); BatchNorm counters are written as 0.
    """
    flat = flatten(nn.meta.unbox(variables))
    layout = _layout(config)
    wanted = {path: (key, shape) for key, (path, shape) in layout.items()}
    missing = sorted("/".join(p) for p in wanted if p not in flat)
    unexpected = sorted("/".join(p) for p in flat if p not in wanted)
    problems: List[str] = []
    if missing:
        problems.append(f"missing variable {missing[0]!r} ({len(missing)} missing: {missing[:6]})")
    if unexpected:
        problems.append(f"unexpected variable {unexpected[0]!r} ({len(unexpected)} unexpected: {unexpected[:6]})")
    out: Dict[str, np.ndarray] = {}
    for key, (path, shape) in layout.items():
        if path not in flat:
            continue
        value = to_numpy(flat[path])
        if tuple(value.shape) != shape:
            problems.append(f"variable {'/'.join(path)!r} has shape {tuple(value.shape)}, expected {shape}")
            continue
        t = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else np.transpose(value)
        out[key] = np.array(t, dtype=np.float32, order="C", copy=True)
        if key.endswith(".bn.running_var"):
            out[key[: -len("running_var")] + _BN_COUNTER] = np.zeros((), np.int64)
    if problems:
        raise InceptionConversionError(f"Inception ({config.variant}) variables do not match: " + "; ".join(problems))
    return out


# --------------------------------------------------------------------- files


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torch_weights(path: str) -> Tuple[Dict[str, Any], str]:
    """(state dict, sha256) from a .pth/.pt (weights only, no arbitrary unpickling) or .safetensors file."""
    if not os.path.isfile(path):
        raise InceptionConversionError(f"weights file {path} does not exist")
    digest = sha256_of(path)
    named = _HASH_IN_NAME.search(os.path.basename(path))
    if named and not digest.startswith(named.group(1)):
        raise InceptionConversionError(
            f"{path}: SHA-256 {digest[:16]}... does not start with {named.group(1)!r} from its file name: the file "
            "is corrupted or truncated (download it again)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            return dict(safetensors.numpy.load_file(path)), digest
        except Exception as e:
            raise InceptionConversionError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    if ext not in (".pth", ".pt", ".bin"):
        raise InceptionConversionError(f"{path}: unknown weights format {ext!r} (expected .pth, .pt or .safetensors)")
    import torch  # deferred: torch is optional and slow to import; only reading a .pth/.pt file needs it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionConversionError(
            f"{path} could not be read as a PyTorch state dict with weights_only=True ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); it must be a plain state dict of tensors "
            "(torch.save(model.state_dict(), ...)), not a pickled model") from e
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items()):
        raise InceptionConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    return dict(obj), digest


def save_torch_weights(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """A torch-named state dict as .safetensors (loads in torch with safetensors.torch.load_file)."""
    if not path.endswith(".safetensors"):
        raise InceptionConversionError(f"{path}: export writes safetensors only; name the file *.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


def config_for(state_dict: Mapping[str, Any], variant: str = "auto") -> InceptionConfig:
    """The config a state dict fits: num_classes from fc.weight; `auto`: fid for 1008 classes, torchvision for 1000.

    The variants differ in pooling, not in weights, so anything else must be named.
    """
    fc = state_dict.get("fc.weight")
    if fc is None or len(fc.shape) != 2:
        raise InceptionConversionError("state dict has no 2-D 'fc.weight': not an Inception-v3 state dict")
    num_classes = int(fc.shape[0])
    if variant == "auto":
        variant = {1008: "fid", 1000: "torchvision"}.get(num_classes)
        if variant is None:
            raise InceptionConversionError(
                f"fc.weight has {num_classes} classes, so the variant cannot be guessed: pass --variant=fid or "
                "--variant=torchvision")
    if variant not in ("fid", "torchvision"):
        raise InceptionConversionError(f"unknown variant {variant!r}; expected auto, fid or torchvision")
    return InceptionConfig(variant=variant, num_classes=num_classes)


def import_torch_weights(torch_weights: str, out: str, variant: str = "auto", overwrite: bool = False,
                         log: Callable[[str], None] = lambda m: None) -> InceptionConfig:
    """Converts a torch weights file into the sdsup model directory `out` (config.json + params.safetensors)."""
    if os.path.exists(os.path.join(out, model_io.PARAMS_FILE)) and not overwrite:
        raise InceptionConversionError(f"{out} already holds a model; pass --overwrite to replace it")
    state_dict, digest = load_torch_weights(torch_weights)
    config = config_for(state_dict, variant)
    log(f"{os.path.basename(torch_weights)}: sha256 {digest}, {len(state_dict)} tensors, variant {config.variant}, "
        f"{config.num_classes} classes")
    variables = inception_from_torch(state_dict, config, log=log)
    model_io.save(out, KIND, config, variables,
                  extra={"source": {"file": os.path.basename(torch_weights), "sha256": digest}})
    return config


def export_torch_weights(model_dir: str, torch_out: str) -> InceptionConfig:
    """The reverse of `import_torch_weights`: an sdsup inception dir -> torch state dict (.safetensors)."""
    kind, config, variables, _ = model_io.load(model_dir)
    if kind != KIND:
        raise InceptionConversionError(f"{model_dir} holds a {kind!r} model, not {KIND!r}")
    save_torch_weights(inception_to_torch(variables, config), torch_out)
    return config


# --------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sdsup.convert.inception",
        description="Convert Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or a "
                    "torchvision inception_v3 state dict) into an sdsup model directory, or back.")
    p.add_argument("--torch_weights", metavar="FILE", help=".pth/.pt/.safetensors state dict to import")
    p.add_argument("--out", metavar="DIR", help="sdsup model directory to write (with --torch_weights)")
    p.add_argument("--variant", default="auto", choices=("auto", "fid", "torchvision"),
                   help="auto: fid for 1008 classes, torchvision for 1000")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--from_model", metavar="DIR", help="sdsup inception model directory to export")
    p.add_argument("--torch_out", metavar="FILE", help="torch state dict to write (.safetensors, with --from_model)")
    return p


def run(argv) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    importing = args.torch_weights is not None or args.out is not None
    exporting = args.from_model is not None or args.torch_out is not None
    if importing == exporting or (importing and not (args.torch_weights and args.out)) or (
            exporting and not (args.from_model and args.torch_out)):
        parser.error("give either --torch_weights and --out (import) or --from_model and --torch_out (export)")
    if "JAX_PLATFORMS" not in os.environ:
        # A small host-side job: keep off any accelerator (jax is imported by
        # now, but its backends start at first use).
        jax.config.update("jax_platforms", "cpu")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if importing:
        config = import_torch_weights(args.torch_weights, args.out, args.variant, args.overwrite, log)
        print(f"imported {args.torch_weights} ({config.variant}, {config.num_classes} classes) into {args.out}")
    else:
        config = export_torch_weights(args.from_model, args.torch_out)
        print(f"exported {args.from_model} ({config.variant}, {config.num_classes} classes) to {args.torch_out}")
    return 0


def main(argv=None) -> int:
    """Errors print as one line (`error: ...`, exit 1), as `python -m sdsup.convert` does; SDSUP_DEBUG=1 re-raises."""
    return run_argparse(run, argv)


if __name__ == "__main__":
    sys.exit(main())
