"""CSAIL semantic-segmentation (`mit_semseg`) ResNet + UPerNet weights <-> sdsup segmenter (style="csail").

ALDM's discriminator and its ADE20K evaluator are mit_semseg's `Resnet`
encoder (`resnet101`) and `UPerNet` decoder (`upernet`), saved as two plain
state dicts, `encoder_epoch_50.pth` and `decoder_epoch_50.pth`. The
architecture is read off the tensor shapes (stem widths, stage widths and
depths, PPM / FPN widths, classes); only the pool scales are not stored and
are mit_semseg's (1, 2, 3, 6) unless given. A dilated encoder
(`resnet101dilated`) has the same keys and shapes but a different network:
it is not supported and cannot be told apart from the weights.

  sdsup variables (unboxed)                      torch key (file)
  backbone/stem/conv_{k}/{conv,norm}             conv{k+1}, bn{k+1}                           (encoder)
  backbone/stage_{i}_block_{j}/layer_{k}/...     layer{i+1}.{j}.conv{k+1}, .bn{k+1}           (encoder)
  backbone/stage_{i}_block_{j}/shortcut/...      layer{i+1}.{j}.downsample.0, .downsample.1   (encoder)
  decode_head/ppm/conv_{i}/{conv,norm}           ppm_conv.{i}.0, ppm_conv.{i}.1               (decoder)
  decode_head/ppm/last                           ppm_last_conv.0, .1                          (decoder)
  decode_head/fpn_in_{i}                         fpn_in.{i}.0, .1                             (decoder)
  decode_head/fpn_out_{i}                        fpn_out.{i}.0.0, .0.1                        (decoder)
  decode_head/fuse                               conv_last.0.0, .0.1                          (decoder)
  decode_head/classifier/{kernel,bias}           conv_last.1.{weight,bias}                    (decoder)

  conv kernel HWIO <-> weight OIHW; BatchNorm params/scale,bias <-> weight,bias;
  batch_stats/mean,var,num_batches_tracked <-> running_mean,running_var,num_batches_tracked.

Every key must be accounted for. Per BatchNorm, `num_batches_tracked` is
optional (torch < 0.4.1 did not save it; 0 when absent), and mit_semseg's
SynchronizedBatchNorm2d bookkeeping buffers `_tmp_running_mean`,
`_tmp_running_var` and `_running_iter` are accepted and dropped (evaluation
uses running_mean / running_var only; the module keeps running = tmp / iter).

`fake_class=True` appends ALDM's "fake" class as the LAST output
(`SegmenterConfig.with_fake_class()`): its classifier row is initialised to
ZERO (kernel and bias), so its logit starts at 0 everywhere and the other
classes' logits are unchanged.

torch is imported only to read `.pth` files, always with
`torch.load(..., weights_only=True)` (never a full unpickle).
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import numpy as np

from sdsup.convert.torch_layout import ConversionError, conv_bn_from_torch, flatten, to_numpy, unflatten
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, SegmenterConfig

KIND = "segmenter"
ENCODER, DECODER = "encoder", "decoder"
# mit_semseg's UPerNet default; AdaptiveAvgPool2d has no weights, so the scales are not in the checkpoint.
POOL_SCALES = (1, 2, 3, 6)

_BN_PARAMS = (("scale", "weight"), ("bias", "bias"))
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"))
_COUNT = "num_batches_tracked"
_SYNC_BN_BUFFERS = ("_tmp_running_mean", "_tmp_running_var", "_running_iter")


class CsailConversionError(ConversionError, SdsupError):
    """A CSAIL checkpoint or sdsup tree that does not fit the conversion (printed as one line by the CLI)."""


# ---------------------------------------------------------------------------
# Layout: one entry per conv / BatchNorm, in torch's registration (state_dict) order.

# (file, torch prefix, flax module path, kind, (out, in, k)); kind "conv", "conv_bias" or "bn" (uses out only).
_Entry = Tuple[str, str, Tuple[str, ...], str, Tuple[int, int, int]]


def _layout(config: SegmenterConfig) -> List[_Entry]:
    if config.style != "csail":
        raise CsailConversionError(f"the CSAIL conversion needs a style='csail' config, got style={config.style!r}")
    out: List[_Entry] = []

    def conv_bn(file, conv, bn, fpath, cin, cout, k):
        out.append((file, conv, fpath + ("conv",), "conv", (cout, cin, k)))
        out.append((file, bn, fpath + ("norm",), "bn", (cout, cin, k)))

    cin = 3
    for k, c in enumerate(config.stem_channels):
        conv_bn(ENCODER, f"conv{k + 1}", f"bn{k + 1}", ("backbone", "stem", f"conv_{k}"), cin, c, 3)
        cin = c
    bottleneck = config.layer_type == "bottleneck"
    for i, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        for j in range(depth):
            stride = config.stage_stride(i) if j == 0 else 1
            tp, fp = f"layer{i + 1}.{j}", ("backbone", f"stage_{i}_block_{j}")
            if bottleneck:
                r = width // 4
                convs = ((cin, r, 1), (r, r, 3), (r, width, 1))
            else:
                convs = ((cin, width, 3), (width, width, 3))
            for k, (a, b, ks) in enumerate(convs):
                conv_bn(ENCODER, f"{tp}.conv{k + 1}", f"{tp}.bn{k + 1}", fp + (f"layer_{k}",), a, b, ks)
            if cin != width or stride != 1:
                conv_bn(ENCODER, f"{tp}.downsample.0", f"{tp}.downsample.1", fp + ("shortcut",), cin, width, 1)
            cin = width

    ch, ppm, feats = config.head_channels, config.ppm_channels, config.feature_channels
    head = ("decode_head",)
    for i in range(len(config.pool_scales)):
        conv_bn(DECODER, f"ppm_conv.{i}.0", f"ppm_conv.{i}.1", head + ("ppm", f"conv_{i}"), feats[-1], ppm, 1)
    conv_bn(DECODER, "ppm_last_conv.0", "ppm_last_conv.1", head + ("ppm", "last"),
            feats[-1] + len(config.pool_scales) * ppm, ch, 3)
    for i, c in enumerate(feats[:-1]):
        conv_bn(DECODER, f"fpn_in.{i}.0", f"fpn_in.{i}.1", head + (f"fpn_in_{i}",), c, ch, 1)
    for i in range(len(feats) - 1):
        conv_bn(DECODER, f"fpn_out.{i}.0.0", f"fpn_out.{i}.0.1", head + (f"fpn_out_{i}",), ch, ch, 3)
    conv_bn(DECODER, "conv_last.0.0", "conv_last.0.1", head + ("fuse",), len(feats) * ch, ch, 3)
    out.append((DECODER, "conv_last.1", head + ("classifier",), "conv_bias", (config.num_classes, ch, 1)))
    return out


def _required(entry: _Entry) -> Dict[str, Tuple[int, ...]]:
    """torch key -> shape of the keys an entry must have."""
    _, prefix, _, kind, (cout, cin, k) = entry
    if kind == "bn":
        return {f"{prefix}.{t}": (cout,) for t in ("weight", "bias", "running_mean", "running_var")}
    keys = {f"{prefix}.weight": (cout, cin, k, k)}
    if kind == "conv_bias":
        keys[f"{prefix}.bias"] = (cout,)
    return keys


def _optional(entry: _Entry) -> Dict[str, Tuple[int, ...]]:
    """torch key -> shape of the BatchNorm buffers that may or may not be saved."""
    _, prefix, _, kind, (cout, _, _) = entry
    if kind != "bn":
        return {}
    return {f"{prefix}.{_COUNT}": (), f"{prefix}._tmp_running_mean": (cout,),
            f"{prefix}._tmp_running_var": (cout,), f"{prefix}._running_iter": (1,)}


def expected_torch_keys(config: SegmenterConfig) -> Dict[str, Dict[str, Tuple[int, ...]]]:
    """{"encoder": {key: shape}, "decoder": {key: shape}}: the keys each file must have (optional BN buffers aside)."""
    out: Dict[str, Dict[str, Tuple[int, ...]]] = {ENCODER: {}, DECODER: {}}
    for entry in _layout(config):
        out[entry[0]].update(_required(entry))
    return out


# ---------------------------------------------------------------------------
# Config from the shapes.


def _shape(sd: Mapping[str, Any], key: str, what: str) -> Tuple[int, ...]:
    if key not in sd:
        hint = ""
        if what == ENCODER and "conv_last.1.weight" in sd:
            hint = " (this looks like a decoder: are --encoder and --decoder swapped?)"
        elif what == DECODER and "conv1.weight" in sd:
            hint = " (this looks like an encoder: are --encoder and --decoder swapped?)"
        elif what == DECODER and any(k.startswith(("ppm.", "cbr.")) for k in sd):
            hint = " (a mit_semseg PPM/C1 decoder; only UPerNet, arch 'upernet' or 'upernet_lite', is supported)"
        elif sd and all(k.startswith("module.") for k in sd):
            hint = " (every key starts with 'module.': saved from a DataParallel wrapper; strip the prefix)"
        elif what == ENCODER:
            hint = " (only mit_semseg's ResNet encoders, arch 'resnet18/50/101', are supported)"
        raise CsailConversionError(f"the {what} state dict has no key {key!r}: not a mit_semseg ResNet + UPerNet "
                                   f"{what}{hint}")
    return tuple(int(d) for d in sd[key].shape)


def config_from_state_dicts(encoder: Mapping[str, Any], decoder: Mapping[str, Any], num_classes: Optional[int] = None,
                            pool_scales: Sequence[int] = POOL_SCALES, image_mean: Sequence[float] = IMAGENET_MEAN,
                            image_std: Sequence[float] = IMAGENET_STD) -> SegmenterConfig:
    """The style="csail" SegmenterConfig the two state dicts fit (read off the shapes; keys checked later)."""
    stem = []
    while f"conv{len(stem) + 1}.weight" in encoder:
        stem.append(_shape(encoder, f"conv{len(stem) + 1}.weight", ENCODER)[0])
    if not stem:
        _shape(encoder, "conv1.weight", ENCODER)  # raises, naming the key
    bottleneck = "layer1.0.conv3.weight" in encoder
    last_conv = "conv3" if bottleneck else "conv2"
    hidden, depths = [], []
    while f"layer{len(depths) + 1}.0.conv1.weight" in encoder:
        i = len(depths) + 1
        depth = 0
        while f"layer{i}.{depth}.conv1.weight" in encoder:
            depth += 1
        hidden.append(_shape(encoder, f"layer{i}.0.{last_conv}.weight", ENCODER)[0])
        depths.append(depth)
    if not depths:
        _shape(encoder, "layer1.0.conv1.weight", ENCODER)

    ppm_channels = _shape(decoder, "ppm_conv.0.0.weight", DECODER)[0]
    branches = 0
    while f"ppm_conv.{branches}.0.weight" in decoder:
        branches += 1
    pool_scales = tuple(int(s) for s in pool_scales)
    if branches != len(pool_scales):
        raise CsailConversionError(f"the decoder has {branches} pyramid pooling branches (ppm_conv.*) but "
                                   f"pool_scales={pool_scales} has {len(pool_scales)}; the scales are not stored in "
                                   "the checkpoint: pass the ones it was trained with")
    fpn = _shape(decoder, "ppm_last_conv.0.weight", DECODER)[0]
    classes = _shape(decoder, "conv_last.1.weight", DECODER)[0]
    if num_classes is not None and int(num_classes) != classes:
        raise CsailConversionError(f"the decoder predicts {classes} classes (conv_last.1.weight), not the "
                                   f"{num_classes} asked for")
    try:
        return SegmenterConfig(style="csail", num_classes=classes, stem_channels=tuple(stem),
                               hidden_sizes=tuple(hidden), depths=tuple(depths),
                               layer_type="bottleneck" if bottleneck else "basic", head_channels=fpn,
                               ppm_channels=ppm_channels, pool_scales=pool_scales,
                               image_mean=tuple(float(x) for x in image_mean),
                               image_std=tuple(float(x) for x in image_std))
    except ValueError as e:
        raise CsailConversionError(f"the checkpoint's shapes give an invalid segmenter config: {e}") from None


# ---------------------------------------------------------------------------
# State dicts <-> variables.


def _check_keys(sd: Mapping[str, Any], entries: List[_Entry], what: str) -> None:
    required: Dict[str, Tuple[int, ...]] = {}
    optional: Dict[str, Tuple[int, ...]] = {}
    for entry in entries:
        required.update(_required(entry))
        optional.update(_optional(entry))
    missing = [k for k in required if k not in sd]
    if missing:
        raise CsailConversionError(f"the {what} state dict is missing key {missing[0]!r} ({len(missing)} missing in "
                                   f"all: {missing[:8]})")
    unexpected = [k for k in sd if k not in required and k not in optional]
    if unexpected:
        raise CsailConversionError(f"the {what} state dict has unexpected key {unexpected[0]!r} ({len(unexpected)} "
                                   f"unexpected in all: {unexpected[:8]})")
    for key, value in sd.items():
        want = required.get(key, optional.get(key))
        got = tuple(int(d) for d in value.shape)
        if got != want:
            raise CsailConversionError(f"the {what} state dict's key {key!r} has shape {got}, expected {want}")


def csail_from_torch(encoder: Mapping[str, Any], decoder: Mapping[str, Any],
                     config: SegmenterConfig) -> Dict[str, Any]:
    """The two CSAIL state dicts (torch tensors or numpy) -> {"params", "batch_stats"} of UperNetSegmenter(config).

    Leaves are fresh numpy arrays (float32; num_batches_tracked int32), the
    form `sdsup.models.io` stores and loads. Raises CsailConversionError
    naming the file and key for a missing, unexpected or wrongly shaped key.
    """
    layout = _layout(config)
    files = {ENCODER: encoder, DECODER: decoder}
    for what, sd in files.items():
        _check_keys(sd, [e for e in layout if e[0] == what], what)
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    for what, prefix, fpath, kind, _ in layout:
        conv_bn_from_torch(files[what], prefix, fpath, kind, flat, CsailConversionError, what)
    return unflatten(flat)


def csail_to_torch(variables: Mapping[str, Any], config: SegmenterConfig,
                   sync_bn_buffers: bool = False) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """{"params", "batch_stats"} of UperNetSegmenter(config) -> (encoder, decoder) state dicts as numpy.

    Keys in torch's state_dict order; floats float32, num_batches_tracked
    int64; fresh writable copies. With `sync_bn_buffers`, every BatchNorm also
    gets mit_semseg's SynchronizedBatchNorm2d buffers (_tmp_running_mean =
    running_mean, _tmp_running_var = running_var, _running_iter = 1, the
    values its constructor keeps), so that `load_state_dict(strict=True)` into
    mit_semseg's own modules works; without, the keys are plain
    torch.nn.BatchNorm2d's. Boxed or unboxed trees; raises
    CsailConversionError naming a missing, unexpected or wrongly shaped variable.
    """
    flat = {k: to_numpy(v) for k, v in flatten(nn.meta.unbox(dict(variables))).items()}
    used = set()

    def take(path: Tuple[str, ...], shape: Tuple[int, ...]) -> np.ndarray:
        name = "/".join(path)
        if path not in flat:
            raise CsailConversionError(f"csail_to_torch: missing variable {name!r}")
        a = flat[path]
        if tuple(a.shape) != shape:
            raise CsailConversionError(f"csail_to_torch: variable {name!r} has shape {tuple(a.shape)}, expected {shape}")
        used.add(path)
        return a

    out = {ENCODER: collections.OrderedDict(), DECODER: collections.OrderedDict()}
    for what, prefix, fpath, kind, (cout, cin, k) in _layout(config):
        sd = out[what]
        if kind == "bn":
            for fname, tname in _BN_PARAMS:
                sd[f"{prefix}.{tname}"] = np.array(take(("params",) + fpath + (fname,), (cout,)), np.float32)
            for fname, tname in _BN_STATS:
                sd[f"{prefix}.{tname}"] = np.array(take(("batch_stats",) + fpath + (fname,), (cout,)), np.float32)
            sd[f"{prefix}.{_COUNT}"] = np.array(take(("batch_stats",) + fpath + (_COUNT,), ()), np.int64)
            if sync_bn_buffers:
                sd[f"{prefix}._tmp_running_mean"] = sd[f"{prefix}.running_mean"].copy()
                sd[f"{prefix}._tmp_running_var"] = sd[f"{prefix}.running_var"].copy()
                sd[f"{prefix}._running_iter"] = np.ones((1,), np.float32)
        else:
            kernel = take(("params",) + fpath + ("kernel",), (k, k, cin, cout))
            sd[f"{prefix}.weight"] = np.array(kernel.transpose(3, 2, 0, 1), np.float32, order="C")
            if kind == "conv_bias":
                sd[f"{prefix}.bias"] = np.array(take(("params",) + fpath + ("bias",), (cout,)), np.float32)
    unexpected = sorted("/".join(p) for p in set(flat) - used)
    if unexpected:
        raise CsailConversionError(f"csail_to_torch: unexpected variable {unexpected[0]!r} ({len(unexpected)} in "
                                   f"all: {unexpected[:8]})")
    return dict(out[ENCODER]), dict(out[DECODER])


def add_fake_class(config: SegmenterConfig, variables: Mapping[str, Any]) -> Tuple[SegmenterConfig, Dict[str, Any]]:
    """ALDM's discriminator: one more output, LAST, for "fake"; its classifier row is zero (kernel and bias)."""
    flat = dict(flatten(dict(variables)))
    kpath, bpath = ("params", "decode_head", "classifier", "kernel"), ("params", "decode_head", "classifier", "bias")
    kernel, bias = np.asarray(flat[kpath]), np.asarray(flat[bpath])
    flat[kpath] = np.concatenate([kernel, np.zeros(kernel.shape[:-1] + (1,), kernel.dtype)], -1)
    flat[bpath] = np.concatenate([bias, np.zeros((1,), bias.dtype)])
    return config.with_fake_class(), unflatten(flat)


# ---------------------------------------------------------------------------
# Files.


def read_state_dict(path: str, what: str) -> Dict[str, Any]:
    """A plain state dict of tensors from a .pth file, read with torch.load(weights_only=True)."""
    if not os.path.isfile(path):
        raise CsailConversionError(f"{what} file {path} does not exist")
    import torch  # deferred: torch is optional and slow to import; only reading a .pth file needs it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CsailConversionError(
            f"{what} file {path} could not be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); it must be a plain state dict of tensors "
            "(torch.save(net.state_dict(), ...)), not a pickled model: this converter never unpickles arbitrary "
            "objects") from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items()):
        raise CsailConversionError(f"{what} file {path} holds a {type(obj).__name__}, not a state dict of named tensors")
    return dict(obj)


def load_csail(encoder_path: str, decoder_path: str, num_classes: Optional[int] = None, fake_class: bool = False,
               image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
               pool_scales: Sequence[int] = POOL_SCALES) -> Tuple[SegmenterConfig, Dict[str, Any]]:
    """(SegmenterConfig, {"params", "batch_stats"}) from mit_semseg's encoder_epoch_*.pth and decoder_epoch_*.pth.

    `num_classes`, if given, must be the decoder's class count (before the
    fake class). `fake_class` appends ALDM's zero-initialised "fake" output
    (last). `image_mean` / `image_std` are what the network expects after
    [-1, 1] -> [0, 1]: ImageNet statistics for ALDM's ADE20K heads, 0.5 / 0.5
    for its Cityscapes 20-class head.
    """
    encoder = read_state_dict(encoder_path, ENCODER)
    decoder = read_state_dict(decoder_path, DECODER)
    config = config_from_state_dicts(encoder, decoder, num_classes, pool_scales, image_mean, image_std)
    variables = csail_from_torch(encoder, decoder, config)
    if fake_class:
        config, variables = add_fake_class(config, variables)
    return config, variables


def convert(encoder_path: str, decoder_path: str, out: str, fake_class: bool = False,
            num_classes: Optional[int] = None, image_mean: Sequence[float] = IMAGENET_MEAN,
            image_std: Sequence[float] = IMAGENET_STD, overwrite: bool = False,
            log: Callable[[str], None] = lambda m: None) -> SegmenterConfig:
    """Writes the sdsup segmenter model directory `out` (what `sdsup.workdir.load_model_dir(out, "segmenter")` reads)."""
    if os.path.exists(os.path.join(out, model_io.PARAMS_FILE)) and not overwrite:
        raise CsailConversionError(f"{out} already holds a model; pass --overwrite to replace it")
    config, variables = load_csail(encoder_path, decoder_path, num_classes=num_classes, fake_class=fake_class,
                                   image_mean=image_mean, image_std=image_std)
    log(f"{os.path.basename(encoder_path)} + {os.path.basename(decoder_path)}: stem {config.stem_channels}, "
        f"stages {config.hidden_sizes} x {config.depths}, FPN {config.head_channels}, PPM {config.ppm_channels}, "
        f"{config.num_classes} outputs" + (" (last: fake, zero-initialised)" if fake_class else ""))
    model_io.save(out, KIND, config, variables, extra={"source": {
        "format": "mit_semseg ResNet + UPerNet", "encoder": os.path.basename(encoder_path),
        "decoder": os.path.basename(decoder_path), "fake_class": bool(fake_class)}})
    return config
