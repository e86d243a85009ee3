"""fyu/drn DRNSeg weights (e.g. `drn-d-105_ms_cityscapes.pth`) <-> sdsup DRNSegmenter.

fyu/drn's `segment.py` saves two kinds of file, both read here:

* `--pretrained` files such as the released `drn-d-105_ms_cityscapes.pth`:
  `DRNSeg.state_dict()`, loaded with `single_model.load_state_dict(torch.load(path))`;
* training checkpoints (`checkpoint_*.pth.tar`): {"epoch", "arch",
  "state_dict", "best_prec1"} where "state_dict" is the DataParallel
  wrapper's, every key prefixed "module.".

DRNSeg's `base` is `nn.Sequential(*list(drn.children())[:-2])`, so its keys
are numbered, not named: `base.0` is layer0, `base.{i}` layer{i}.

  sdsup variables (unboxed)                      torch key
  base/layer0/{conv,bn}                          base.0.0, base.0.1
  base/layer{i}_{j}/{conv,bn}    (i = 1, 2, 7, 8) base.{i}.{3j}, base.{i}.{3j+1}   (the ReLU is base.{i}.{3j+2})
  base/layer{i}_{j}/conv{k},bn{k} (i = 3 .. 6)   base.{i}.{j}.conv{k}, .bn{k}
  base/layer{i}_0/downsample/{conv,bn}           base.{i}.0.downsample.0, .downsample.1
  seg/{kernel,bias}                              seg.weight, seg.bias
  (nothing: a constant of the model)             up.weight

  conv kernel HWIO <-> weight OIHW; BatchNorm params/scale,bias <-> weight,bias;
  batch_stats/mean,var,num_batches_tracked <-> running_mean,running_var,num_batches_tracked.

The architecture is read off the shapes (block type, the 8 depths and
widths, classes from `seg.weight`). Every key must be accounted for: a
missing, unexpected or wrongly shaped key raises DRNConversionError naming
it. `num_batches_tracked` is optional per BatchNorm (the 2017-2018 torch that
saved fyu/drn's files did not write it; 0 when absent). `up.weight` must be
fyu/drn's fixed bilinear fill (`fill_up_weights`, never trained: its
requires_grad is False); it is checked and not stored, since DRNSegmenter
computes the same kernel itself. `drn_to_torch` writes it back.

torch is imported only to read `.pth` files, always with
`torch.load(..., weights_only=True)` (never a full unpickle).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

import flax.linen as nn
import numpy as np

from sdsup.convert.torch_layout import ConversionError, conv_bn_from_torch, flatten, to_numpy, unflatten
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.drn import BLOCK_LAYERS, LAYER_STRIDES, UP_KERNEL, DRNConfig, bilinear_up_kernel

# Suggested model kind for sdsup.models.io (not registered there by this module).
KIND = "drn_segmenter"

_BN_PARAMS = (("scale", "weight"), ("bias", "bias"))
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"))
_COUNT = "num_batches_tracked"
_UP = "up.weight"
# |file's up.weight - bilinear fill|: the fill's values are exact in float32, so anything above rounding is a
# different (unsupported) upsampler.
_UP_ATOL = 1e-6
_ARCH_FIELDS = ("num_classes", "arch", "block", "depths", "channels")


class DRNConversionError(ConversionError, SdsupError):
    """A DRN checkpoint or sdsup tree that does not fit the conversion (printed as one line by the CLI)."""


# ---------------------------------------------------------------------------
# Layout: one entry per conv / BatchNorm, in torch's state_dict order.

# (torch prefix, flax module path, kind, (out, in, k)); kind "conv", "conv_bias" or "bn" (uses out only).
_Entry = Tuple[str, Tuple[str, ...], str, Tuple[int, int, int]]


def _layout(config: DRNConfig) -> List[_Entry]:
    out: List[_Entry] = []

    def conv_bn(conv, bn, fpath, cin, cout, k):
        out.append((conv, fpath + ("conv",), "conv", (cout, cin, k)))
        out.append((bn, fpath + ("bn",), "bn", (cout, cin, k)))

    conv_bn("base.0.0", "base.0.1", ("base", "layer0"), 3, config.channels[0], 7)
    cin = config.channels[0]
    bottleneck = config.block == "bottleneck"
    for i, (depth, planes) in enumerate(zip(config.depths, config.channels)):
        n = i + 1
        for j in range(depth):
            fp = ("base", f"layer{n}_{j}")
            if i not in BLOCK_LAYERS:
                conv_bn(f"base.{n}.{3 * j}", f"base.{n}.{3 * j + 1}", fp, cin, planes, 3)
                cin = planes
                continue
            width = config.layer_channels[i]
            convs = ((cin, planes, 1), (planes, planes, 3), (planes, width, 1)) if bottleneck else \
                ((cin, planes, 3), (planes, planes, 3))
            tp = f"base.{n}.{j}"
            for k, (a, b, ks) in enumerate(convs, 1):
                out.append((f"{tp}.conv{k}", fp + (f"conv{k}",), "conv", (b, a, ks)))
                out.append((f"{tp}.bn{k}", fp + (f"bn{k}",), "bn", (b, a, ks)))
            # fyu/drn: a projection where the stride is not 1 (first block of layer3/4) or the width changes.
            if j == 0 and (LAYER_STRIDES[i] != 1 or cin != width):
                conv_bn(f"{tp}.downsample.0", f"{tp}.downsample.1", fp + ("downsample",), cin, width, 1)
            cin = width
    out.append(("seg", ("seg",), "conv_bias", (config.num_classes, cin, 1)))
    return out


def _required(entry: _Entry) -> Dict[str, Tuple[int, ...]]:
    prefix, _, kind, (cout, cin, k) = entry
    if kind == "bn":
        return {f"{prefix}.{t}": (cout,) for t in ("weight", "bias", "running_mean", "running_var")}
    keys = {f"{prefix}.weight": (cout, cin, k, k)}
    if kind == "conv_bias":
        keys[f"{prefix}.bias"] = (cout,)
    return keys


def expected_torch_keys(config: DRNConfig) -> Dict[str, Tuple[int, ...]]:
    """{torch key: shape} a DRNSeg state dict of `config` has (num_batches_tracked aside, up.weight included)."""
    keys: Dict[str, Tuple[int, ...]] = {}
    for entry in _layout(config):
        keys.update(_required(entry))
    keys[_UP] = (config.num_classes, 1, UP_KERNEL, UP_KERNEL)
    return keys


def _optional(config: DRNConfig) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.{_COUNT}": () for prefix, _, kind, _ in _layout(config) if kind == "bn"}


# ---------------------------------------------------------------------------
# Config from the shapes.

_BASE_KEY = re.compile(r"^base\.(\d+)\.(\d+)\.")


def _shape(sd: Mapping[str, Any], key: str) -> Tuple[int, ...]:
    if key not in sd:
        hint = ""
        if not any(k.startswith("base.") for k in sd):
            hint = " (no 'base.*' keys: not a fyu/drn DRNSeg state dict"
            if any(k.startswith("layer0.") or k.startswith("conv1.") for k in sd):
                hint += "; this looks like a bare DRN classifier, without the segmentation head"
            hint += ")"
        raise DRNConversionError(f"the DRN state dict is missing key {key!r}{hint}")
    return tuple(int(d) for d in sd[key].shape)


def config_from_state_dict(sd: Mapping[str, Any], **overrides) -> DRNConfig:
    """The DRNConfig a DRNSeg state dict fits, read off its shapes (keys are checked later, by `drn_from_torch`).

    `overrides` may set image_mean, image_std and dtype; an architecture
    field (num_classes, arch, block, depths, channels) must agree with the file.
    """
    fields = {f.name for f in dataclasses.fields(DRNConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise DRNConversionError(f"unknown DRNConfig field(s) {unknown}; known: {sorted(fields)}")
    if _shape(sd, "base.0.0.weight")[1:] != (3, 7, 7):
        raise DRNConversionError(f"base.0.0.weight has shape {_shape(sd, 'base.0.0.weight')}, expected a 7x7 "
                                 "conv from 3 channels: not a DRN arch 'D' stem (arch 'C' is not supported)")
    seen: Dict[int, int] = collections.defaultdict(lambda: -1)  # layer -> largest index after base.{layer}.
    for key in sd:
        m = _BASE_KEY.match(key)
        if m:
            seen[int(m.group(1))] = max(seen[int(m.group(1))], int(m.group(2)))
    bottleneck = any(re.match(r"^base\.[3-6]\.\d+\.conv3\.", k) for k in sd)
    depths, channels = [], []
    for i in range(8):
        n = i + 1
        if seen[n] < 0:
            _shape(sd, f"base.{n}.0.{'conv1.' if i in BLOCK_LAYERS else ''}weight")  # raises, naming it
        if i in BLOCK_LAYERS:
            depths.append(seen[n] + 1)
            channels.append(_shape(sd, f"base.{n}.0.conv1.weight")[0])
        else:
            depths.append(seen[n] // 3 + 1)
            channels.append(_shape(sd, f"base.{n}.0.weight")[0])
    seg = _shape(sd, "seg.weight")
    if len(seg) != 4:
        raise DRNConversionError(f"seg.weight has shape {seg}, expected a 1x1 conv [classes, channels, 1, 1]")
    inferred = dict(num_classes=seg[0], arch="D", block="bottleneck" if bottleneck else "basic",
                    depths=tuple(depths), channels=tuple(channels))
    for name in _ARCH_FIELDS:
        if name in overrides:
            want = overrides.pop(name)
            want = tuple(want) if isinstance(want, list) else want
            if want != inferred[name]:
                raise DRNConversionError(f"{name}={want!r} was asked for but the checkpoint has "
                                         f"{name}={inferred[name]!r}")
    try:
        return DRNConfig(**inferred, **overrides)
    except ValueError as e:
        raise DRNConversionError(f"the checkpoint's shapes give an invalid DRN config: {e}") from None


# ---------------------------------------------------------------------------
# State dict <-> variables.


def _float32(value) -> np.ndarray:
    # A private float32 copy: never a view of torch memory.
    return np.array(to_numpy(value), dtype=np.float32, copy=True)


def check_up_weight(value: Any, num_classes: int) -> None:
    """Raises unless `value` is DRNSeg's bilinear `up.weight` [classes, 1, 16, 16] (fill_up_weights)."""
    want = bilinear_up_kernel(num_classes)
    got = _float32(value)
    if got.shape != want.shape:
        raise DRNConversionError(f"the DRN state dict's key {_UP!r} has shape {got.shape}, expected {want.shape}")
    err = float(np.max(np.abs(got - want)))
    if not err <= _UP_ATOL:
        raise DRNConversionError(f"the DRN state dict's {_UP!r} is not fyu/drn's fixed bilinear upsampling kernel "
                                 f"(max deviation {err:.3g}); only that upsampler is supported")


def _check_keys(sd: Mapping[str, Any], config: DRNConfig) -> None:
    required = expected_torch_keys(config)
    optional = _optional(config)
    missing = [k for k in required if k not in sd]
    if missing:
        hint = " (DRNSeg(use_torch_up=True) has no up.weight; only the ConvTranspose2d upsampler is supported)" \
            if missing == [_UP] else ""
        raise DRNConversionError(f"the DRN state dict is missing key {missing[0]!r} ({len(missing)} missing in all: "
                                 f"{missing[:8]}){hint}")
    unexpected = [k for k in sd if k not in required and k not in optional]
    if unexpected:
        raise DRNConversionError(f"the DRN state dict has unexpected key {unexpected[0]!r} ({len(unexpected)} "
                                 f"unexpected in all: {unexpected[:8]})")
    for key, value in sd.items():
        want = required.get(key, optional.get(key))
        got = tuple(int(d) for d in value.shape)
        if got != want:
            raise DRNConversionError(f"the DRN state dict's key {key!r} has shape {got}, expected {want}")


def drn_from_torch(sd: Mapping[str, Any], config: DRNConfig) -> Dict[str, Any]:
    """A DRNSeg state dict (torch tensors or numpy) -> {"params", "batch_stats"} of DRNSegmenter(config).

    Leaves are fresh numpy arrays (float32; num_batches_tracked int32).
    Raises DRNConversionError naming a missing, unexpected or wrongly shaped
    key, or an `up.weight` that is not the bilinear fill.
    """
    _check_keys(sd, config)
    check_up_weight(sd[_UP], config.num_classes)
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    for prefix, fpath, kind, _ in _layout(config):
        conv_bn_from_torch(sd, prefix, fpath, kind, flat, DRNConversionError, "DRN")
    return unflatten(flat)


def drn_to_torch(config: DRNConfig, variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """{"params", "batch_stats"} of DRNSegmenter(config) -> DRNSeg state dict as numpy, torch key names and order.

    Floats float32, num_batches_tracked int64, `up.weight` the bilinear
    fill; fresh writable copies (`{k: torch.from_numpy(v)}` loads with
    `DRNSeg.load_state_dict(strict=True)`). Boxed or unboxed trees; raises
    DRNConversionError naming a missing, unexpected or wrongly shaped variable.
    """
    flat = {k: to_numpy(v) for k, v in flatten(nn.meta.unbox(dict(variables))).items()}
    used = set()

    def take(path: Tuple[str, ...], shape: Tuple[int, ...]) -> np.ndarray:
        name = "/".join(path)
        if path not in flat:
            raise DRNConversionError(f"drn_to_torch: missing variable {name!r}")
        a = flat[path]
        if tuple(a.shape) != shape:
            raise DRNConversionError(f"drn_to_torch: variable {name!r} has shape {tuple(a.shape)}, expected {shape}")
        used.add(path)
        return a

    sd: Dict[str, np.ndarray] = collections.OrderedDict()
    for prefix, fpath, kind, (cout, cin, k) in _layout(config):
        if kind == "bn":
            for fname, tname in _BN_PARAMS:
                sd[f"{prefix}.{tname}"] = np.array(take(("params",) + fpath + (fname,), (cout,)), np.float32)
            for fname, tname in _BN_STATS:
                sd[f"{prefix}.{tname}"] = np.array(take(("batch_stats",) + fpath + (fname,), (cout,)), np.float32)
            sd[f"{prefix}.{_COUNT}"] = np.array(take(("batch_stats",) + fpath + (_COUNT,), ()), np.int64)
        else:
            kernel = take(("params",) + fpath + ("kernel",), (k, k, cin, cout))
            sd[f"{prefix}.weight"] = np.array(kernel.transpose(3, 2, 0, 1), np.float32, order="C")
            if kind == "conv_bias":
                sd[f"{prefix}.bias"] = np.array(take(("params",) + fpath + ("bias",), (cout,)), np.float32)
    sd[_UP] = bilinear_up_kernel(config.num_classes)
    unexpected = sorted("/".join(p) for p in set(flat) - used)
    if unexpected:
        raise DRNConversionError(f"drn_to_torch: unexpected variable {unexpected[0]!r} ({len(unexpected)} in all: "
                                 f"{unexpected[:8]})")
    return dict(sd)


# ---------------------------------------------------------------------------
# Files.


def read_state_dict(path: str) -> Dict[str, Any]:
    """DRNSeg's state dict from a .pth / .pth.tar file, read with torch.load(weights_only=True).

    Accepts a plain state dict or a segment.py checkpoint {"state_dict": ...,
    "epoch", ...}; a "module." prefix on every key (DataParallel) is removed.
    """
    if not os.path.isfile(path):
        raise DRNConversionError(f"DRN weights file {path} does not exist")
    import torch  # deferred: torch is heavy and optional; only reading a .pth file needs it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DRNConversionError(
            f"DRN weights file {path} could not be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); it must hold a state dict of tensors (DRNSeg.state_dict(), or "
            "segment.py's checkpoint dict), not a pickled model: this converter never unpickles arbitrary "
            "objects") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items()):
        raise DRNConversionError(f"DRN weights file {path} holds a {type(obj).__name__}, not a state dict of named "
                                 "tensors")
    sd = dict(obj)
    prefixed = [k.startswith("module.") for k in sd]
    if sd and all(prefixed):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    elif any(prefixed):
        key = next(k for k in sd if k.startswith("module."))
        raise DRNConversionError(f"DRN weights file {path}: some keys (e.g. {key!r}) start with 'module.' and "
                                 "others do not")
    return sd


def load_drn(path: str, **overrides) -> Tuple[DRNConfig, Dict[str, Any]]:
    """(DRNConfig, {"params", "batch_stats"}) from a fyu/drn DRNSeg file such as `drn-d-105_ms_cityscapes.pth`.

    The architecture comes from the file; `overrides` may set image_mean,
    image_std (default: fyu/drn's Cityscapes statistics) and dtype, and may
    repeat architecture fields, which must then agree with the file.
    """
    sd = read_state_dict(path)
    try:
        config = config_from_state_dict(sd, **overrides)
        return config, drn_from_torch(sd, config)
    except DRNConversionError as e:
        raise DRNConversionError(f"{path}: {e}") from None


def convert(path: str, out: str, overwrite: bool = False, log: Callable[[str], None] = lambda m: None,
            **overrides) -> DRNConfig:
    """Writes the sdsup model directory `out` (kind "drn_segmenter") from a fyu/drn DRNSeg file."""
    if os.path.exists(os.path.join(out, model_io.PARAMS_FILE)) and not overwrite:
        raise DRNConversionError(f"{out} already holds a model; pass --overwrite to replace it")
    config, variables = load_drn(path, **overrides)
    log(f"{os.path.basename(path)}: DRN-{config.arch} layers {config.depths}, channels {config.channels}, "
        f"{config.num_classes} classes")
    model_io.save(out, KIND, config, variables, extra={"source": {"format": "fyu/drn DRNSeg",
                                                                  "file": os.path.basename(path)}})
    return config
