"""UperNet + ResNet segmenter configs and weights <-> transformers' UperNetForSemanticSegmentation.

The correspondence is generated from the config, one entry per conv / norm,
so both directions share it and every key is accounted for:

  flax params (unboxed)                       torch state_dict
  backbone/embedder/conv/kernel        HWIO   backbone.embedder.embedder.convolution.weight   OIHW
  backbone/embedder/norm/{scale,bias}         backbone.embedder.embedder.normalization.{weight,bias}
  batch_stats .../norm/{mean,var,num_batches_tracked}
                                              ....normalization.{running_mean,running_var,num_batches_tracked}
  backbone/stage_{i}_block_{j}/layer_{k}      backbone.encoder.stages.{i}.layers.{j}.layer.{k}
  backbone/stage_{i}_block_{j}/shortcut       backbone.encoder.stages.{i}.layers.{j}.shortcut
  decode_head/psp_{i}                         decode_head.psp_modules.{i}.1  (conv, batch_norm)
  decode_head/{bottleneck,fpn_bottleneck}     decode_head.{bottleneck,fpn_bottleneck}
  decode_head/lateral_{i}, fpn_{i}            decode_head.lateral_convs.{i}, fpn_convs.{i}
  decode_head/classifier/{kernel,bias}        decode_head.classifier.{weight,bias}
  auxiliary_head/conv_{k}, conv_cat           auxiliary_head.convs.{k}, conv_cat
  auxiliary_head/classifier                   auxiliary_head.classifier
"""

from typing import Any, Dict, List, Mapping, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdsup.models.segmenter import AUX_IN_INDEX, BOTTLENECK_REDUCTION, SegmenterConfig

# ---------------------------------------------------------------------------
# Configs.


def segmenter_config_from_transformers(config: Union[Mapping[str, Any], Any], **overrides) -> SegmenterConfig:
    """From a transformers `UperNetConfig` or its `to_dict()` / config.json form.

    Only a ResNet backbone is supported. The image normalisation is not part
    of a UperNetConfig (it lives in the image processor); pass `image_mean` /
    `image_std` as overrides if the checkpoint used something other than
    ImageNet statistics.
    """
    d = config if isinstance(config, Mapping) else config.to_dict()
    if d.get("model_type", "upernet") != "upernet":
        raise ValueError(f"expected an UperNet config, got model_type={d.get('model_type')!r}")
    bb = d.get("backbone_config")
    if bb is None:
        bb = {}  # transformers then builds a default ResNet with all stages as outputs.
    elif not isinstance(bb, Mapping):
        bb = bb.to_dict()
    if bb.get("model_type", "resnet") != "resnet":
        raise ValueError(f"only ResNet backbones are supported, got {bb.get('model_type')!r}")
    if bb.get("hidden_act", "relu") != "relu":
        raise ValueError(f"only relu backbones are supported, got {bb.get('hidden_act')!r}")
    if bb.get("num_channels", 3) != 3:
        raise ValueError("the segmenter takes RGB images (num_channels=3)")
    defaults = SegmenterConfig()
    depths = tuple(bb.get("depths", defaults.depths))
    stage_names = ("stem",) + tuple(f"stage{i + 1}" for i in range(len(depths)))
    out_features = bb.get("out_features")
    if out_features is None and bb.get("out_indices") is not None:
        out_features = [stage_names[i] for i in bb["out_indices"]]
    if out_features is None:
        out_features = stage_names[1:]
    if "num_labels" in d:
        num_labels = d["num_labels"]
    elif d.get("id2label") is not None:
        num_labels = len(d["id2label"])
    else:
        num_labels = 2  # transformers' PreTrainedConfig default.
    kwargs = dict(
        num_classes=int(num_labels),
        embedding_size=bb.get("embedding_size", defaults.embedding_size),
        hidden_sizes=tuple(bb.get("hidden_sizes", defaults.hidden_sizes)),
        depths=depths,
        layer_type=bb.get("layer_type", defaults.layer_type),
        downsample_in_first_stage=bool(bb.get("downsample_in_first_stage", False)),
        downsample_in_bottleneck=bool(bb.get("downsample_in_bottleneck", False)),
        out_features=tuple(out_features),
        head_channels=d.get("hidden_size", 512),
        pool_scales=tuple(d.get("pool_scales", (1, 2, 3, 6))),
        use_auxiliary_head=bool(d.get("use_auxiliary_head", True)),
        auxiliary_channels=d.get("auxiliary_channels", 256),
        auxiliary_num_convs=d.get("auxiliary_num_convs", 1),
        auxiliary_concat_input=bool(d.get("auxiliary_concat_input", False)),
        auxiliary_in_channels=d.get("auxiliary_in_channels"),
    )
    kwargs.update(overrides)
    return SegmenterConfig(**kwargs)


def segmenter_config_to_transformers(config: SegmenterConfig):
    """The equivalent transformers `UperNetConfig`."""
    from transformers import ResNetConfig, UperNetConfig  # deferred: transformers is heavy; only this needs it

    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=config.embedding_size,
        hidden_sizes=list(config.hidden_sizes),
        depths=list(config.depths),
        layer_type=config.layer_type,
        hidden_act="relu",
        downsample_in_first_stage=config.downsample_in_first_stage,
        downsample_in_bottleneck=config.downsample_in_bottleneck,
        out_features=list(config.feature_stages),
    )
    return UperNetConfig(
        backbone_config=backbone,
        hidden_size=config.head_channels,
        pool_scales=list(config.pool_scales),
        num_labels=config.num_classes,
        use_auxiliary_head=config.use_auxiliary_head,
        auxiliary_channels=config.auxiliary_channels,
        auxiliary_num_convs=config.auxiliary_num_convs,
        auxiliary_concat_input=config.auxiliary_concat_input,
        auxiliary_in_channels=config.auxiliary_in_channels,
    )


# ---------------------------------------------------------------------------
# State dicts.

# Layout entry: (flax module path, torch prefix, kind, (out, in, k)); kind is
# "conv" (kernel only), "conv_bias" (kernel + bias) or "bn"; bn uses out only.
_Entry = Tuple[Tuple[str, ...], str, str, Tuple[int, int, int]]

_BN_PARAMS = (("scale", "weight"), ("bias", "bias"))
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"), ("num_batches_tracked", "num_batches_tracked"))
_INT32_MAX = np.iinfo(np.int32).max


def _layout(config: SegmenterConfig) -> List[_Entry]:
    out: List[_Entry] = []

    def conv_norm(fpath, tprefix, cin, cout, k, torch_names=("convolution", "normalization")):
        out.append((fpath + ("conv",), f"{tprefix}.{torch_names[0]}", "conv", (cout, cin, k)))
        out.append((fpath + ("norm",), f"{tprefix}.{torch_names[1]}", "bn", (cout, cin, k)))

    # Backbone.
    conv_norm(("backbone", "embedder"), "backbone.embedder.embedder", 3, config.embedding_size, 7)
    cin = config.embedding_size
    for i, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        for j in range(depth):
            stride = config.stage_stride(i) if j == 0 else 1
            fp = ("backbone", f"stage_{i}_block_{j}")
            tp = f"backbone.encoder.stages.{i}.layers.{j}"
            if cin != width or stride != 1:
                conv_norm(fp + ("shortcut",), f"{tp}.shortcut", cin, width, 1)
            if config.layer_type == "bottleneck":
                r = width // BOTTLENECK_REDUCTION
                convs = ((cin, r, 1), (r, r, 3), (r, width, 1))
            else:
                convs = ((cin, width, 3), (width, width, 3))
            for k, (a, b, ks) in enumerate(convs):
                conv_norm(fp + (f"layer_{k}",), f"{tp}.layer.{k}", a, b, ks)
            cin = width

    # UperNet head; UperNetConvModule names its parts conv / batch_norm.
    head_names = ("conv", "batch_norm")
    ch = config.head_channels
    feats = config.feature_channels
    # Same order as transformers' state_dict (module registration order).
    out.append((("decode_head", "classifier"), "decode_head.classifier", "conv_bias", (config.num_classes, ch, 1)))
    for i in range(len(config.pool_scales)):
        conv_norm(("decode_head", f"psp_{i}"), f"decode_head.psp_modules.{i}.1", feats[-1], ch, 1, head_names)
    conv_norm(("decode_head", "bottleneck"), "decode_head.bottleneck",
              feats[-1] + len(config.pool_scales) * ch, ch, 3, head_names)
    for i, c in enumerate(feats[:-1]):
        conv_norm(("decode_head", f"lateral_{i}"), f"decode_head.lateral_convs.{i}", c, ch, 1, head_names)
    for i in range(len(feats) - 1):
        conv_norm(("decode_head", f"fpn_{i}"), f"decode_head.fpn_convs.{i}", ch, ch, 3, head_names)
    conv_norm(("decode_head", "fpn_bottleneck"), "decode_head.fpn_bottleneck", len(feats) * ch, ch, 3, head_names)

    if config.use_auxiliary_head:
        a_in, a_ch = feats[AUX_IN_INDEX], config.auxiliary_channels
        c = a_in
        for k in range(config.auxiliary_num_convs):
            conv_norm(("auxiliary_head", f"conv_{k}"), f"auxiliary_head.convs.{k}", c, a_ch, 3, head_names)
            c = a_ch
        if config.auxiliary_concat_input:
            conv_norm(("auxiliary_head", "conv_cat"), "auxiliary_head.conv_cat", a_in + c, a_ch, 3, head_names)
            c = a_ch
        out.append((("auxiliary_head", "classifier"), "auxiliary_head.classifier", "conv_bias", (config.num_classes, c, 1)))
    return out


def _to_numpy(v) -> np.ndarray:
    """A private copy: `Tensor.numpy()` shares memory with the tensor and JAX's CPU
    backend may in turn alias a numpy buffer, so without the copy a later in-place
    torch update (BatchNorm running stats in train mode) would silently change
    the "immutable" JAX arrays returned here."""
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch here.
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()  # numpy has no bfloat16.
        v = v.numpy()
    return np.array(v, copy=True)


def _set(tree: Dict, path: Tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _flatten(tree: Mapping, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _torch_shapes(entry: _Entry) -> Dict[str, Tuple[int, ...]]:
    """torch key suffix -> expected shape."""
    _, _, kind, (cout, cin, k) = entry
    if kind == "bn":
        return {"weight": (cout,), "bias": (cout,), "running_mean": (cout,), "running_var": (cout,),
                "num_batches_tracked": ()}
    shapes = {"weight": (cout, cin, k, k)}
    if kind == "conv_bias":
        shapes["bias"] = (cout,)
    return shapes


def expected_torch_keys(config: SegmenterConfig) -> Dict[str, Tuple[int, ...]]:
    """Every key of the PyTorch state_dict for `config`, with its shape."""
    keys = {}
    for entry in _layout(config):
        for suffix, shape in _torch_shapes(entry).items():
            keys[f"{entry[1]}.{suffix}"] = shape
    return keys


def segmenter_from_torch(state_dict: Mapping[str, Any], config: SegmenterConfig):
    """transformers UperNetForSemanticSegmentation state_dict -> (params, batch_stats).

    Returns unboxed float32 trees for `UperNetSegmenter(config)`. Raises
    KeyError for a missing or unexpected key and ValueError for a wrong shape,
    naming the key.
    """
    expected = expected_torch_keys(config)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise KeyError(f"segmenter_from_torch: missing key {missing[0]!r} ({len(missing)} missing in all: {missing[:8]})")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise KeyError(
            f"segmenter_from_torch: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all: {unexpected[:8]})"
        )
    arrays = {}
    for key, shape in expected.items():
        a = _to_numpy(state_dict[key])
        if a.shape != shape:
            raise ValueError(f"segmenter_from_torch: key {key!r} has shape {a.shape}, expected {shape}")
        arrays[key] = a

    params: Dict = {}
    stats: Dict = {}
    for fpath, tprefix, kind, _ in _layout(config):
        if kind == "bn":
            for fname, tname in _BN_PARAMS:
                _set(params, fpath + (fname,), jnp.asarray(arrays[f"{tprefix}.{tname}"], jnp.float32))
            for fname, tname in _BN_STATS:
                a = arrays[f"{tprefix}.{tname}"]
                if fname == "num_batches_tracked":
                    if not 0 <= int(a) <= _INT32_MAX:
                        raise ValueError(f"segmenter_from_torch: key {tprefix}.{tname} = {int(a)} does not fit int32")
                    _set(stats, fpath + (fname,), jnp.asarray(a, jnp.int32))
                else:
                    _set(stats, fpath + (fname,), jnp.asarray(a, jnp.float32))
        else:
            # OIHW -> HWIO.
            _set(params, fpath + ("kernel",), jnp.asarray(arrays[f"{tprefix}.weight"].transpose(2, 3, 1, 0), jnp.float32))
            if kind == "conv_bias":
                _set(params, fpath + ("bias",), jnp.asarray(arrays[f"{tprefix}.bias"], jnp.float32))
    return params, stats


def segmenter_to_torch(params, batch_stats, config: SegmenterConfig) -> Dict[str, np.ndarray]:
    """(params, batch_stats) of `UperNetSegmenter(config)` -> transformers state_dict as numpy.

    Accepts boxed or unboxed trees. Floats come out float32, num_batches_tracked
    int64 (torch's dtype); every array is a fresh writable copy, never a view of
    a JAX buffer (torch.from_numpy would otherwise share it). Raises KeyError for a missing or unexpected Flax
    variable and ValueError for a wrong shape, naming the variable.
    """
    flat_p = {("params",) + k: np.asarray(v) for k, v in _flatten(nn.meta.unbox(params)).items()}
    flat_s = {("batch_stats",) + k: np.asarray(v) for k, v in _flatten(nn.meta.unbox(batch_stats)).items()}
    flat = {**flat_p, **flat_s}
    used = set()

    def take(path: Tuple[str, ...], shape: Tuple[int, ...]) -> np.ndarray:
        name = "/".join(path)
        if path not in flat:
            raise KeyError(f"segmenter_to_torch: missing Flax variable {name!r}")
        a = flat[path]
        if a.shape != shape:
            raise ValueError(f"segmenter_to_torch: Flax variable {name!r} has shape {a.shape}, expected {shape}")
        used.add(path)
        return a

    out: Dict[str, np.ndarray] = {}
    for entry in _layout(config):
        fpath, tprefix, kind, (cout, cin, k) = entry
        if kind == "bn":
            for fname, tname in _BN_PARAMS:
                out[f"{tprefix}.{tname}"] = np.array(take(("params",) + fpath + (fname,), (cout,)), np.float32)
            for fname, tname in _BN_STATS:
                shape = () if fname == "num_batches_tracked" else (cout,)
                dtype = np.int64 if fname == "num_batches_tracked" else np.float32
                out[f"{tprefix}.{tname}"] = np.array(take(("batch_stats",) + fpath + (fname,), shape), dtype)
        else:
            kernel = take(("params",) + fpath + ("kernel",), (k, k, cin, cout))
            out[f"{tprefix}.weight"] = np.array(kernel.transpose(3, 2, 0, 1), np.float32, order="C")
            if kind == "conv_bias":
                out[f"{tprefix}.bias"] = np.array(take(("params",) + fpath + ("bias",), (cout,)), np.float32)
    unexpected = sorted(set(flat) - used)
    if unexpected:
        names = ["/".join(p) for p in unexpected]
        raise KeyError(f"segmenter_to_torch: unexpected Flax variable {names[0]!r} ({len(names)} in all: {names[:8]})")
    return out
