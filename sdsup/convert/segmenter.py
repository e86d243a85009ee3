"""UperNet + ResNet / ConvNeXt segmenter configs and weights <-> transformers' UperNetForSemanticSegmentation.

The correspondence is generated from the config, one entry per conv / norm /
linear, so both directions share it and every key is accounted for:

  flax params (unboxed)                       torch state_dict
  backbone=resnet:
  backbone/embedder/conv/kernel        HWIO   backbone.embedder.embedder.convolution.weight   OIHW
  backbone/embedder/norm/{scale,bias}         backbone.embedder.embedder.normalization.{weight,bias}
  batch_stats .../norm/{mean,var,num_batches_tracked}
                                              ....normalization.{running_mean,running_var,num_batches_tracked}
  backbone/stage_{i}_block_{j}/layer_{k}      backbone.encoder.stages.{i}.layers.{j}.layer.{k}
  backbone/stage_{i}_block_{j}/shortcut       backbone.encoder.stages.{i}.layers.{j}.shortcut
  backbone=convnext (LayerNorm scale,bias <-> weight,bias; Dense kernel [in, out] <-> Linear weight [out, in]):
  backbone/embedder_{conv,norm}               backbone.embeddings.{patch_embeddings,layernorm}
  backbone/stage_{i}_downsample_{norm,conv}   backbone.encoder.stages.{i}.downsampling_layer.{0,1}   (i > 0)
  backbone/stage_{i}_block_{j}/layer_scale    backbone.encoder.stages.{i}.layers.{j}.layer_scale_parameter
  backbone/stage_{i}_block_{j}/{dwconv,norm,pwconv1,pwconv2}
                                              backbone.encoder.stages.{i}.layers.{j}.{dwconv,layernorm,pwconv1,pwconv2}
  backbone/norm_{stage}                       backbone.hidden_states_norms.{stage}   (per out_feature)
  head (either backbone):
  decode_head/psp_{i}                         decode_head.psp_modules.{i}.1  (conv, batch_norm)
  decode_head/{bottleneck,fpn_bottleneck}     decode_head.{bottleneck,fpn_bottleneck}
  decode_head/lateral_{i}, fpn_{i}            decode_head.lateral_convs.{i}, fpn_convs.{i}
  decode_head/classifier/{kernel,bias}        decode_head.classifier.{weight,bias}
  auxiliary_head/conv_{k}, conv_cat           auxiliary_head.convs.{k}, conv_cat
  auxiliary_head/classifier                   auxiliary_head.classifier

`load_transformers_upernet(directory)` reads a local `save_pretrained`
directory (config.json + model.safetensors, or its shards; never a pickle)
and its preprocessor_config.json (for the image normalisation) if present;
`convert(directory, out)` writes it as an sdsup segmenter model directory.
"""

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdsup.convert.pipeline_files import read_json
from sdsup.convert.safetensors_io import TRANSFORMERS_WEIGHTS, read_state_dict
from sdsup.convert.torch_layout import ConversionError
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.segmenter import (
    AUX_IN_INDEX,
    BOTTLENECK_REDUCTION,
    CONVNEXT_DOWNSAMPLE,
    CONVNEXT_DW_KERNEL,
    CONVNEXT_MLP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmenterConfig,
)

KIND = "segmenter"
# transformers' ConvNextConfig defaults (a config.json omits the fields left at them).
CONVNEXT_DEFAULTS = dict(patch_size=4, num_stages=4, hidden_sizes=(96, 192, 384, 768), depths=(3, 3, 9, 3),
                         hidden_act="gelu", layer_scale_init_value=1e-6)


class UperNetConversionError(ConversionError, SdsupError):
    """A transformers UperNet directory that cannot be converted (printed as one line by the CLIs)."""


# ---------------------------------------------------------------------------
# Configs.


def _stage_out_features(bb: Mapping[str, Any], stage_names: Sequence[str], default: Sequence[str]) -> List[str]:
    out_features = bb.get("out_features")
    if out_features is None and bb.get("out_indices") is not None:
        out_features = [stage_names[i] for i in bb["out_indices"]]
    if out_features is None:
        out_features = list(default)
    return list(out_features)


def _convnext_fields(bb: Mapping[str, Any]) -> Dict[str, Any]:
    """SegmenterConfig fields of a ConvNextConfig (dict form)."""
    g = lambda k: bb.get(k, CONVNEXT_DEFAULTS[k])  # noqa: E731
    if g("hidden_act") != "gelu":
        raise ValueError(f"only gelu ConvNeXt backbones are supported, got {g('hidden_act')!r}")
    depths, hidden_sizes = tuple(g("depths")), tuple(g("hidden_sizes"))
    if g("num_stages") != len(depths) or len(hidden_sizes) != len(depths):
        # transformers builds num_stages stages but names len(depths) of them: refuse a mismatch.
        raise ValueError(f"ConvNeXt num_stages={g('num_stages')} must equal len(depths)={len(depths)} and "
                         f"len(hidden_sizes)={len(hidden_sizes)}")
    patch = g("patch_size")
    if isinstance(patch, (list, tuple)):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise ValueError(f"only square ConvNeXt patches are supported, got patch_size={patch}")
        patch = patch[0]
    stage_names = ("stem",) + tuple(f"stage{i + 1}" for i in range(len(depths)))
    # ConvNextConfig without out_features / out_indices outputs only the last stage.
    out_features = _stage_out_features(bb, stage_names, stage_names[-1:])
    # transformers creates the layer-scale parameter only for a value > 0. drop_path_rate is training-only
    # (stochastic depth, identity in eval mode) and is not carried over.
    scale = float(g("layer_scale_init_value"))
    return dict(backbone="convnext", hidden_sizes=hidden_sizes, depths=depths, patch_size=int(patch),
                layer_scale_init_value=scale if scale > 0 else 0.0, out_features=tuple(out_features))


def segmenter_config_from_transformers(config: Union[Mapping[str, Any], Any], **overrides) -> SegmenterConfig:
    """From a transformers `UperNetConfig` or its `to_dict()` / config.json form.

    ResNet and ConvNeXt backbones are supported. The image normalisation is
    not part of a UperNetConfig (it lives in the image processor); pass
    `image_mean` / `image_std` as overrides if the checkpoint used something
    other than ImageNet statistics (`load_transformers_upernet` reads them
    from preprocessor_config.json).
    """
    d = config if isinstance(config, Mapping) else config.to_dict()
    if d.get("model_type", "upernet") != "upernet":
        raise ValueError(f"expected an UperNet config, got model_type={d.get('model_type')!r}")
    bb = d.get("backbone_config")
    if bb is None:
        if d.get("use_timm_backbone") or d.get("backbone"):
            raise ValueError(f"only transformers ResNet and ConvNeXt backbones are supported, got the named "
                             f"backbone {d.get('backbone')!r}")
        bb = {}  # transformers then builds a default ResNet with all stages as outputs.
    elif not isinstance(bb, Mapping):
        bb = bb.to_dict()
    bb_type = bb.get("model_type", "resnet")
    if bb_type not in ("resnet", "convnext"):
        raise ValueError(f"only ResNet and ConvNeXt backbones are supported, got {bb_type!r}")
    if bb.get("num_channels", 3) != 3:
        raise ValueError("the segmenter takes RGB images (num_channels=3)")
    if "num_labels" in d:
        num_labels = d["num_labels"]
    elif d.get("id2label") is not None:
        num_labels = len(d["id2label"])
    else:
        num_labels = 2  # transformers' PreTrainedConfig default.
    if bb_type == "convnext":
        kwargs = _convnext_fields(bb)
    else:
        if bb.get("hidden_act", "relu") != "relu":
            raise ValueError(f"only relu backbones are supported, got {bb.get('hidden_act')!r}")
        defaults = SegmenterConfig()
        depths = tuple(bb.get("depths", defaults.depths))
        stage_names = ("stem",) + tuple(f"stage{i + 1}" for i in range(len(depths)))
        kwargs = dict(
            embedding_size=bb.get("embedding_size", defaults.embedding_size),
            hidden_sizes=tuple(bb.get("hidden_sizes", defaults.hidden_sizes)),
            depths=depths,
            layer_type=bb.get("layer_type", defaults.layer_type),
            downsample_in_first_stage=bool(bb.get("downsample_in_first_stage", False)),
            downsample_in_bottleneck=bool(bb.get("downsample_in_bottleneck", False)),
            out_features=tuple(_stage_out_features(bb, stage_names, stage_names[1:])),
        )
    kwargs.update(
        num_classes=int(num_labels),
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
    """The equivalent transformers `UperNetConfig` (style "transformers")."""
    from transformers import ConvNextConfig, ResNetConfig, UperNetConfig  # deferred: heavy; only this needs it

    if config.style != "transformers":
        raise ValueError(f"style={config.style!r} has no transformers equivalent")
    if config.backbone == "convnext":
        backbone = ConvNextConfig(
            num_channels=3,
            patch_size=config.patch_size,
            num_stages=len(config.depths),
            hidden_sizes=list(config.hidden_sizes),
            depths=list(config.depths),
            hidden_act="gelu",
            layer_scale_init_value=config.layer_scale_init_value,
            out_features=list(config.feature_stages),
        )
    else:
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
# "conv" (kernel only), "conv_bias" (kernel + bias; a depthwise conv has in = 1),
# "bn" (BatchNorm2d), "ln" (LayerNorm), "dense" (Linear, k unused) or
# "layer_scale" (ConvNeXt's per-channel gamma, the block's own parameter);
# bn, ln and layer_scale use out only.
_Entry = Tuple[Tuple[str, ...], str, str, Tuple[int, int, int]]

_BN_PARAMS = (("scale", "weight"), ("bias", "bias"))
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"), ("num_batches_tracked", "num_batches_tracked"))
_INT32_MAX = np.iinfo(np.int32).max


def _resnet_layout(config: SegmenterConfig, out: List[_Entry]) -> None:
    def conv_norm(fpath, tprefix, cin, cout, k):
        out.append((fpath + ("conv",), f"{tprefix}.convolution", "conv", (cout, cin, k)))
        out.append((fpath + ("norm",), f"{tprefix}.normalization", "bn", (cout, cin, k)))

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


def _convnext_layout(config: SegmenterConfig, out: List[_Entry]) -> None:
    # In torch's state_dict order: a module's own parameters (layer_scale_parameter) before its children.
    c0 = config.hidden_sizes[0]
    out.append((("backbone", "embedder_conv"), "backbone.embeddings.patch_embeddings", "conv_bias",
                (c0, 3, config.patch_size)))
    out.append((("backbone", "embedder_norm"), "backbone.embeddings.layernorm", "ln", (c0, c0, 0)))
    cin = c0
    for i, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        tp = f"backbone.encoder.stages.{i}"
        if i > 0:
            out.append((("backbone", f"stage_{i}_downsample_norm"), f"{tp}.downsampling_layer.0", "ln",
                        (cin, cin, 0)))
            out.append((("backbone", f"stage_{i}_downsample_conv"), f"{tp}.downsampling_layer.1", "conv_bias",
                        (width, cin, CONVNEXT_DOWNSAMPLE)))
        for j in range(depth):
            fp = ("backbone", f"stage_{i}_block_{j}")
            lp = f"{tp}.layers.{j}"
            if config.layer_scale_init_value > 0:
                out.append((fp, lp, "layer_scale", (width, width, 0)))
            out.append((fp + ("dwconv",), f"{lp}.dwconv", "conv_bias", (width, 1, CONVNEXT_DW_KERNEL)))
            out.append((fp + ("norm",), f"{lp}.layernorm", "ln", (width, width, 0)))
            out.append((fp + ("pwconv1",), f"{lp}.pwconv1", "dense", (CONVNEXT_MLP_RATIO * width, width, 0)))
            out.append((fp + ("pwconv2",), f"{lp}.pwconv2", "dense", (width, CONVNEXT_MLP_RATIO * width, 0)))
        cin = width
    for stage, c in zip(config.feature_stages, config.feature_channels):
        out.append((("backbone", f"norm_{stage}"), f"backbone.hidden_states_norms.{stage}", "ln", (c, c, 0)))


def _layout(config: SegmenterConfig) -> List[_Entry]:
    if config.style != "transformers":
        raise ValueError(f"style={config.style!r} is not transformers' UperNet (see sdsup.convert.csail)")
    out: List[_Entry] = []

    def conv_norm(fpath, tprefix, cin, cout, k, torch_names=("convolution", "normalization")):
        out.append((fpath + ("conv",), f"{tprefix}.{torch_names[0]}", "conv", (cout, cin, k)))
        out.append((fpath + ("norm",), f"{tprefix}.{torch_names[1]}", "bn", (cout, cin, k)))

    # Backbone.
    if config.backbone == "convnext":
        _convnext_layout(config, out)
    else:
        _resnet_layout(config, out)

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


# One leaf of an entry: (flax collection, flax leaf path, torch key, torch shape, layout); layout is
# "copy", "count" (num_batches_tracked: int32 in Flax, int64 in torch), "conv" (OIHW <-> HWIO) or
# "dense" ([out, in] <-> [in, out]).
_Leaf = Tuple[str, Tuple[str, ...], str, Tuple[int, ...], str]


def _leaves(entry: _Entry) -> List[_Leaf]:
    """An entry's variables, in torch's state_dict order."""
    fpath, tprefix, kind, (cout, cin, k) = entry
    if kind == "bn":
        leaves = [("params", fpath + (f,), f"{tprefix}.{t}", (cout,), "copy") for f, t in _BN_PARAMS]
        for f, t in _BN_STATS:
            count = f == "num_batches_tracked"
            leaves.append(("batch_stats", fpath + (f,), f"{tprefix}.{t}", () if count else (cout,),
                           "count" if count else "copy"))
        return leaves
    if kind == "ln":
        return [("params", fpath + (f,), f"{tprefix}.{t}", (cout,), "copy") for f, t in _BN_PARAMS]
    if kind == "layer_scale":
        return [("params", fpath + ("layer_scale",), f"{tprefix}.layer_scale_parameter", (cout,), "copy")]
    if kind == "dense":
        leaves = [("params", fpath + ("kernel",), f"{tprefix}.weight", (cout, cin), "dense")]
    else:
        leaves = [("params", fpath + ("kernel",), f"{tprefix}.weight", (cout, cin, k, k), "conv")]
    if kind in ("conv_bias", "dense"):
        leaves.append(("params", fpath + ("bias",), f"{tprefix}.bias", (cout,), "copy"))
    return leaves


def _flax_shape(torch_shape: Tuple[int, ...], layout: str) -> Tuple[int, ...]:
    if layout == "conv":
        return tuple(torch_shape[i] for i in (2, 3, 1, 0))
    if layout == "dense":
        return tuple(reversed(torch_shape))
    return torch_shape


def expected_torch_keys(config: SegmenterConfig) -> Dict[str, Tuple[int, ...]]:
    """Every key of the PyTorch state_dict for `config`, with its shape, in torch's order."""
    return {leaf[2]: leaf[3] for entry in _layout(config) for leaf in _leaves(entry)}


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

    trees: Dict[str, Dict] = {"params": {}, "batch_stats": {}}
    for entry in _layout(config):
        for col, fpath, tkey, _, layout in _leaves(entry):
            a = arrays[tkey]
            if layout == "count":
                if not 0 <= int(a) <= _INT32_MAX:
                    raise ValueError(f"segmenter_from_torch: key {tkey} = {int(a)} does not fit int32")
                value = jnp.asarray(a, jnp.int32)
            elif layout == "conv":
                value = jnp.asarray(a.transpose(2, 3, 1, 0), jnp.float32)  # OIHW -> HWIO
            elif layout == "dense":
                value = jnp.asarray(a.T, jnp.float32)
            else:
                value = jnp.asarray(a, jnp.float32)
            _set(trees[col], fpath, value)
    return trees["params"], trees["batch_stats"]


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
        for col, fpath, tkey, tshape, layout in _leaves(entry):
            a = take((col,) + fpath, _flax_shape(tshape, layout))
            if layout == "count":
                out[tkey] = np.array(a, np.int64)
            elif layout == "conv":
                out[tkey] = np.array(a.transpose(3, 2, 0, 1), np.float32, order="C")
            elif layout == "dense":
                out[tkey] = np.array(a.T, np.float32, order="C")
            else:
                out[tkey] = np.array(a, np.float32)
    unexpected = sorted(set(flat) - used)
    if unexpected:
        names = ["/".join(p) for p in unexpected]
        raise KeyError(f"segmenter_to_torch: unexpected Flax variable {names[0]!r} ({len(names)} in all: {names[:8]})")
    return out


# ---------------------------------------------------------------------------
# Files: a transformers `save_pretrained` directory -> sdsup segmenter.

# transformers' BaseImageProcessor defaults (SegformerImageProcessor, which UperNet checkpoints use).
_RESCALE_FACTOR = 1 / 255


def _rgb(value, what: str) -> Tuple[float, ...]:
    v = [float(value)] * 3 if isinstance(value, (int, float)) else [float(x) for x in value]
    if len(v) != 3:
        raise UperNetConversionError(
            f"preprocessor_config.json: {what} must have one value per RGB channel, got {value}")
    return tuple(v)


def normalization_overrides(directory: str, image_mean=None, image_std=None) -> Dict[str, Tuple[float, ...]]:
    """{"image_mean", "image_std"} for a transformers segmenter directory: the given values, else its
    preprocessor_config.json's, else none (the config's defaults)."""
    if image_mean is None and image_std is None:
        path = os.path.join(directory, "preprocessor_config.json")
        if os.path.isfile(path):
            pre = read_json(path, "image processor config")
            if not isinstance(pre, Mapping):
                raise UperNetConversionError(f"{path} does not hold a config object")
            image_mean, image_std = normalization_from_preprocessor(pre)
    norm = {}
    if image_mean is not None:
        norm["image_mean"] = tuple(float(x) for x in image_mean)
    if image_std is not None:
        norm["image_std"] = tuple(float(x) for x in image_std)
    return norm


def normalization_from_preprocessor(preprocessor: Mapping[str, Any]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(image_mean, image_std) on [0, 1] pixels equivalent to a transformers image processor's rescale + normalise.

    The processor maps 0..255 pixels p to (p * r - mean) / std (r = rescale_factor,
    1 without do_rescale; identity without do_normalize), i.e. (u - mean / k) / (std / k)
    for u = p / 255 and k = 255 r. So ImageNet statistics in [0, 1] units with
    the default r = 1/255 and mmseg's 0..255 units ([123.675, 116.28, 103.53] /
    [58.395, 57.12, 57.375]) with do_rescale=false both give ImageNet's.
    Resizing (the checkpoints' 512x512) is left to the caller.
    """
    do_rescale = bool(preprocessor.get("do_rescale", True))
    k = 255.0 * float(preprocessor.get("rescale_factor", _RESCALE_FACTOR)) if do_rescale else 255.0
    if not k > 0:
        raise UperNetConversionError(f"preprocessor_config.json: rescale_factor must be positive, got "
                                     f"{preprocessor.get('rescale_factor')}")
    if preprocessor.get("do_normalize", True):
        mean = _rgb(preprocessor.get("image_mean", IMAGENET_MEAN), "image_mean")
        std = _rgb(preprocessor.get("image_std", IMAGENET_STD), "image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if min(std) <= 0:
        raise UperNetConversionError(f"preprocessor_config.json: image_std must be positive, got {std}")
    # 12 significant digits: 0.485 * 255 / 255 stays 0.485, not 0.48500000000000004.
    clean = lambda xs: tuple(float(f"{x / k:.12g}") for x in xs)  # noqa: E731
    return clean(mean), clean(std)


def load_transformers_upernet(directory: str, image_mean: Optional[Sequence[float]] = None,
                              image_std: Optional[Sequence[float]] = None,
                              **overrides) -> Tuple[SegmenterConfig, Dict[str, Any]]:
    """(SegmenterConfig, {"params", "batch_stats"}) of a transformers UperNetForSemanticSegmentation directory.

    `directory` is what `save_pretrained` writes: config.json and
    model.safetensors (or its shards); pickle weights are refused, never read.
    ResNet and ConvNeXt backbones (e.g. the openmmlab/upernet-convnext-*
    ADE20K checkpoints). The image normalisation comes from `image_mean` /
    `image_std` if given, else from the directory's preprocessor_config.json
    (`normalization_from_preprocessor`), else ImageNet's (SegformerImageProcessor's
    defaults). `overrides` are further SegmenterConfig fields. Raises
    UperNetConversionError naming the file or the missing / unexpected /
    misshapen key.
    """
    if not os.path.isdir(directory):
        raise UperNetConversionError(f"{directory} is not a directory")
    config_json = read_json(os.path.join(directory, "config.json"), "UperNet config")
    if not isinstance(config_json, Mapping):
        raise UperNetConversionError(f"{directory}/config.json does not hold a config object")
    norm = normalization_overrides(directory, image_mean, image_std)
    try:
        config = segmenter_config_from_transformers(config_json, **norm, **overrides)
    except (TypeError, ValueError) as e:
        raise UperNetConversionError(f"{directory}/config.json: {e}") from None
    state, _ = read_state_dict(directory, TRANSFORMERS_WEIGHTS)
    try:
        params, stats = segmenter_from_torch(state, config)
    except KeyError as e:
        raise UperNetConversionError(f"{directory}: {e.args[0]}") from None
    except ValueError as e:
        raise UperNetConversionError(f"{directory}: {e}") from None
    return config, {"params": params, "batch_stats": stats}


def convert(directory: str, out: str, image_mean: Optional[Sequence[float]] = None,
            image_std: Optional[Sequence[float]] = None, overwrite: bool = False,
            log: Callable[[str], None] = lambda m: None) -> SegmenterConfig:
    """Writes `directory` (a transformers UperNet save_pretrained dir) as the sdsup segmenter model directory `out`
    (what `sdsup.workdir.load_model_dir(out, "segmenter")` reads, e.g. for --config.evalseg.pretrained=OUT)."""
    if os.path.exists(os.path.join(out, model_io.PARAMS_FILE)) and not overwrite:
        raise UperNetConversionError(f"{out} already holds a model; pass --overwrite to replace it")
    config, variables = load_transformers_upernet(directory, image_mean=image_mean, image_std=image_std)
    log(f"{directory}: {config.backbone} stages {config.hidden_sizes} x {config.depths}, features "
        f"{config.feature_stages}, head {config.head_channels}, {config.num_classes} classes, "
        f"auxiliary head {'on' if config.use_auxiliary_head else 'off'}, image mean {config.image_mean} std "
        f"{config.image_std}")
    model_io.save(out, KIND, config, variables, extra={"source": {
        "format": f"transformers UperNetForSemanticSegmentation ({config.backbone})",
        "directory": os.path.basename(os.path.normpath(directory))}})
    return config
