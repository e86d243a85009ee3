"""transformers SegformerForSemanticSegmentation directory <-> sdsup SegformerSegmenter.

`load_transformers_segformer(directory)` reads a local `save_pretrained`
directory (or a copy of a Hub repository such as
nvidia/segformer-b0-finetuned-ade-512-512): config.json, the weights
(model.safetensors or its shards; else pytorch_model.bin or its shards, read
with `torch.load(..., weights_only=True)`, never a full unpickle) and, if
present, preprocessor_config.json for the image normalisation.
`convert(source_dir, out_dir)` writes it as an sdsup model directory of kind
"segformer_segmenter". Nothing is downloaded: only files in the directory are read.

Weight names. The released checkpoints, and transformers' save_pretrained
(which writes the released names back), use the original names; transformers
>= 5 renames its modules and maps the names when loading. Both are accepted
(a `model.state_dict()` saved as pytorch_model.bin has the new ones). Flax
paths mirror the new names:

  flax params (unboxed)                                   file (released names)
  segformer/stages_{i}/patch_embeddings/{proj,layer_norm}  segformer.encoder.patch_embeddings.{i}.{proj,layer_norm}
  segformer/stages_{i}/blocks_{j}/...                      segformer.encoder.block.{i}.{j}....
    layernorm_before, layernorm_after                        layer_norm_1, layer_norm_2
    attention/{q,k,v}_proj, attention/o_proj                 attention.self.{query,key,value}, attention.output.dense
    attention/sequence_reduction/sequence_reduction          attention.self.sr          (sr_ratio > 1)
    attention/sequence_reduction/layer_norm                  attention.self.layer_norm  (sr_ratio > 1)
    mlp/fc1, mlp/dwconv/dwconv, mlp/fc2                      mlp.dense1, mlp.dwconv.dwconv, mlp.dense2
  segformer/stages_{i}/layer_norm                          segformer.encoder.layer_norm.{i}
  decode_head/linear_projections_{i}/proj                  decode_head.linear_c.{i}.proj
  decode_head/{linear_fuse,batch_norm,classifier}          decode_head.{linear_fuse,batch_norm,classifier}

  conv kernel HWIO <-> weight OIHW, Dense kernel [in, out] <-> Linear weight [out, in], LayerNorm and
  BatchNorm scale <-> weight; batch_stats decode_head/batch_norm/{mean,var,num_batches_tracked} <->
  decode_head.batch_norm.{running_mean,running_var,num_batches_tracked} (the count optional, 0 when absent).

The architecture comes from config.json (transformers' SegformerConfig
fields; absent ones take its defaults); every weight is then checked: a
missing, unexpected or wrongly shaped key raises SegformerConversionError
naming it. config.json's `id2label` names are kept in the model directory
(its "labels" entry) for reference; sdsup matches classes by index.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import numpy as np

from sdsup.convert.pipeline_files import PipelineConvertError, read_json
from sdsup.convert.safetensors_io import TRANSFORMERS_WEIGHTS, read_state_dict
from sdsup.convert.segmenter import UperNetConversionError, normalization_overrides
from sdsup.convert.torch_layout import (
    ConversionError,
    conv_bn_from_torch,
    flatten,
    params_from_torch,
    params_to_torch,
    shapes_of,
    to_numpy,
    torch_key,
    torch_shape,
    unflatten,
)
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.segformer import (
    MIT_B0_HIDDEN_SIZES,
    MIT_DEPTHS,
    MIT_HEADS,
    MIT_MLP_RATIOS,
    MIT_PATCH_SIZES,
    MIT_SR_RATIOS,
    MIT_STRIDES,
    SegformerConfig,
    abstract_variables,
)

# Suggested model kind for sdsup.models.io (not registered there by this module).
KIND = "segformer_segmenter"
MODEL_TYPE = "segformer"
ARCHITECTURE = "SegformerForSemanticSegmentation"
PICKLE_WEIGHTS = "pytorch_model.bin"
# transformers' SegformerConfig defaults, for fields a config.json leaves out.
TRANSFORMERS_DEFAULTS = dict(num_encoder_blocks=4, hidden_sizes=MIT_B0_HIDDEN_SIZES, depths=MIT_DEPTHS,
                             num_attention_heads=MIT_HEADS, sr_ratios=MIT_SR_RATIOS, patch_sizes=MIT_PATCH_SIZES,
                             strides=MIT_STRIDES, mlp_ratios=MIT_MLP_RATIOS, decoder_hidden_size=256,
                             hidden_act="gelu", num_channels=3)
# transformers' PreTrainedConfig default when a config has neither num_labels nor id2label.
DEFAULT_NUM_LABELS = 2
# Flax list modules (`stages_0`), whose torch keys are `stages.0`.
SEQUENCE_NAMES = ("stages", "blocks", "linear_projections")
_BN_PREFIX = "decode_head.batch_norm"
_BN_PATH = ("decode_head", "batch_norm")
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"))
_COUNT = "num_batches_tracked"

# Released (and save_pretrained) weight names -> transformers >= 5 module names, and back; each list is applied
# in order, every rule to every key. The stage-level rules are anchored, so that a block's or a patch
# embedding's `layer_norm` is not taken for a stage's.
_TO_CURRENT = (
    (r"^segformer\.encoder\.patch_embeddings\.(\d+)\.", r"segformer.stages.\1.patch_embeddings."),
    (r"^segformer\.encoder\.block\.(\d+)\.(\d+)\.", r"segformer.stages.\1.blocks.\2."),
    (r"^segformer\.encoder\.layer_norm\.(\d+)\.", r"segformer.stages.\1.layer_norm."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attention\.self\.layer_norm\.", ".attention.sequence_reduction.layer_norm."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
    (r"^decode_head\.linear_c\.", "decode_head.linear_projections."),
)
_TO_RELEASED = (
    (r"^segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.", r"segformer.encoder.block.\1.\2."),
    (r"^segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
)


class SegformerConversionError(ConversionError, SdsupError):
    """A Segformer directory or sdsup tree that does not fit the conversion (printed as one line by the CLI)."""


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def current_name(key: str) -> str:
    """A Segformer weight name in transformers >= 5 module naming (released names are renamed, others kept)."""
    return _rename(key, _TO_CURRENT)


def released_name(key: str) -> str:
    """A Segformer weight name as the released checkpoints and save_pretrained spell it."""
    return _rename(key, _TO_RELEASED)


# ---------------------------------------------------------------------------
# Configs.


def segformer_config_from_transformers(config: Mapping[str, Any], **overrides) -> SegformerConfig:
    """From a transformers SegformerConfig's config.json / `to_dict()` form; `overrides` are further fields
    (image_mean, image_std, dtype). Raises SegformerConversionError for a config that is not a Segformer
    segmenter or that sdsup cannot run."""
    d = config if isinstance(config, Mapping) else config.to_dict()
    if d.get("model_type") != MODEL_TYPE:
        raise SegformerConversionError(f"expected a Segformer config (model_type {MODEL_TYPE!r}), got model_type="
                                       f"{d.get('model_type')!r}")
    architectures = d.get("architectures") or []
    if architectures and ARCHITECTURE not in architectures:
        raise SegformerConversionError(f"the config describes a {', '.join(map(str, architectures))}, not a "
                                       f"{ARCHITECTURE} (a segmenter with a decode head)")
    get = lambda k: d.get(k, TRANSFORMERS_DEFAULTS[k])  # noqa: E731
    if get("num_channels") != 3:
        raise SegformerConversionError(f"the segmenter takes RGB images (num_channels=3), got {get('num_channels')}")
    if get("hidden_act") != "gelu":
        raise SegformerConversionError(f"only hidden_act='gelu' is supported, got {get('hidden_act')!r}")
    stages = get("num_encoder_blocks")
    per_stage = {}
    for name in ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides",
                 "mlp_ratios"):
        value = get(name)
        if not isinstance(value, (list, tuple)):
            raise SegformerConversionError(f"{name} must be a list with one entry per stage, got {value!r}")
        value = tuple(value)
        if len(value) != stages:
            # transformers indexes these per stage and would fail (or silently ignore extras) at build time.
            raise SegformerConversionError(f"{name} has {len(value)} entries but num_encoder_blocks={stages}")
        per_stage[name] = value
    if "num_labels" in d:
        num_labels = d["num_labels"]
    elif d.get("id2label"):
        num_labels = len(d["id2label"])
    else:
        num_labels = DEFAULT_NUM_LABELS
    try:
        return SegformerConfig(num_classes=int(num_labels), decoder_hidden_size=int(get("decoder_hidden_size")),
                               **per_stage, **overrides)
    except (TypeError, ValueError) as e:
        raise SegformerConversionError(f"the config gives an invalid Segformer: {e}") from None


def labels_from_transformers(config: Mapping[str, Any]) -> Optional[List[str]]:
    """config.json's class names in class order (`id2label`), or None without one."""
    id2label = config.get("id2label")
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------
# State dicts <-> variables.


def _param_shapes(config: SegformerConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """Flat Flax parameter shapes of SegformerSegmenter(config) (paths without the "params" prefix)."""
    return dict(_traced_param_shapes(config))


@functools.lru_cache(maxsize=16)
def _traced_param_shapes(config: SegformerConfig) -> Tuple[Tuple[Tuple[str, ...], Tuple[int, ...]], ...]:
    # Tracing a deep encoder (MiT-b5: 52 blocks) is slow, and every conversion and key check needs the shapes.
    # The input is large enough that no attention's reduction conv sees a map smaller than its kernel; the
    # shapes do not depend on it (the model has no position embeddings).
    side = int(np.prod(config.strides)) * max(config.sr_ratios)
    boxed = abstract_variables(config, side, side)
    return tuple(shapes_of(nn.meta.unbox(boxed["params"])).items())


def expected_torch_keys(config: SegformerConfig, released_names: bool = False) -> Dict[str, Tuple[int, ...]]:
    """{key: shape} of a SegformerForSemanticSegmentation state dict of `config`, num_batches_tracked aside;
    in transformers >= 5 module names, or the released ones."""
    keys = {torch_key(path, SEQUENCE_NAMES): torch_shape(path[-1], shape)
            for path, shape in _param_shapes(config).items()}
    for _, tname in _BN_STATS:
        keys[f"{_BN_PREFIX}.{tname}"] = (config.decoder_hidden_size,)
    return {released_name(k): v for k, v in keys.items()} if released_names else keys


def segformer_from_torch(state_dict: Mapping[str, Any], config: SegformerConfig) -> Dict[str, Any]:
    """A SegformerForSemanticSegmentation state dict (either naming; torch tensors or numpy) -> {"params",
    "batch_stats"} of SegformerSegmenter(config): fresh float32 numpy arrays (num_batches_tracked int32).

    Raises SegformerConversionError naming a missing, unexpected or wrongly shaped key (missing keys in
    the file's naming).
    """
    current: Dict[str, Any] = {}
    file_name: Dict[str, str] = {}
    for key, value in state_dict.items():
        name = current_name(key)
        if name in current:
            raise SegformerConversionError(f"the Segformer state dict holds {name!r} twice (as {file_name[name]!r} "
                                           f"and {key!r})")
        current[name], file_name[name] = value, key
    released = any(k != file_name[k] for k in current)
    if not any(k.startswith("decode_head.") for k in current):
        raise SegformerConversionError(f"the state dict has no decode_head.* weights: not a {ARCHITECTURE} (a bare "
                                       "SegformerModel or an image classifier?)")
    required = expected_torch_keys(config)
    optional = {f"{_BN_PREFIX}.{_COUNT}": ()}
    missing = [k for k in required if k not in current]
    if missing:
        shown = [released_name(k) if released else k for k in missing]
        raise SegformerConversionError(f"the Segformer state dict is missing key {shown[0]!r} ({len(shown)} missing "
                                       f"in all: {shown[:8]})")
    unexpected = [file_name[k] for k in current if k not in required and k not in optional]
    if unexpected:
        raise SegformerConversionError(f"the Segformer state dict has unexpected key {unexpected[0]!r} "
                                       f"({len(unexpected)} unexpected in all: {unexpected[:8]})")
    for name, value in current.items():
        want = required.get(name, optional.get(name))
        got = tuple(int(d) for d in np.shape(value))
        if got != want:
            raise SegformerConversionError(f"the Segformer state dict's key {file_name[name]!r} has shape {got}, "
                                           f"expected {want}")
    shapes = {p: s for p, s in _param_shapes(config).items() if p[:2] != _BN_PATH}
    params = params_from_torch(current, shapes, SEQUENCE_NAMES, model="Segformer",
                               ignore=lambda k: k.startswith(_BN_PREFIX + "."), dtype=np.float32)
    flat = {("params",) + path: value for path, value in flatten(params).items()}
    conv_bn_from_torch(current, _BN_PREFIX, _BN_PATH, "bn", flat, SegformerConversionError, "Segformer")
    return unflatten(flat)


def segformer_to_torch(config: SegformerConfig, variables: Mapping[str, Any],
                       released_names: bool = True) -> Dict[str, np.ndarray]:
    """{"params", "batch_stats"} of SegformerSegmenter(config) -> SegformerForSemanticSegmentation state dict as
    numpy (floats float32, num_batches_tracked int64), in the released names (what save_pretrained writes and
    from_pretrained reads) or transformers >= 5 module names (what `model.load_state_dict` takes).

    Boxed or unboxed trees; raises SegformerConversionError for a missing, unexpected or wrongly shaped variable.
    """
    tree = nn.meta.unbox(dict(variables))
    if set(tree) != {"params", "batch_stats"}:
        raise SegformerConversionError(f"segformer_to_torch: expected the collections params and batch_stats, got "
                                       f"{sorted(tree)}")
    stats = {k: to_numpy(v) for k, v in flatten(tree["batch_stats"]).items()}
    want = {_BN_PATH + (f,): (config.decoder_hidden_size,) for f, _ in _BN_STATS}
    want[_BN_PATH + (_COUNT,)] = ()
    for path in sorted(set(want) | set(stats)):
        name = "batch_stats/" + "/".join(path)
        if path not in stats:
            raise SegformerConversionError(f"segformer_to_torch: missing variable {name!r}")
        if path not in want:
            raise SegformerConversionError(f"segformer_to_torch: unexpected variable {name!r}")
        if stats[path].shape != want[path]:
            raise SegformerConversionError(f"segformer_to_torch: variable {name!r} has shape {stats[path].shape}, "
                                           f"expected {want[path]}")
    try:
        sd = params_to_torch(tree["params"], _param_shapes(config), SEQUENCE_NAMES, model="Segformer")
    except ConversionError as e:
        raise SegformerConversionError(f"segformer_to_torch: {e}") from None
    for fname, tname in _BN_STATS:
        sd[f"{_BN_PREFIX}.{tname}"] = stats[_BN_PATH + (fname,)]
    sd[f"{_BN_PREFIX}.{_COUNT}"] = np.array(stats[_BN_PATH + (_COUNT,)], np.int64)
    # Fresh writable float32 copies: torch.from_numpy must never share a JAX buffer.
    sd = {k: np.array(v, np.float32) if v.dtype.kind == "f" else v for k, v in sd.items()}
    return {released_name(k): v for k, v in sd.items()} if released_names else sd


# ---------------------------------------------------------------------------
# Files.


def _torch_load(path: str) -> Dict[str, Any]:
    import torch  # deferred: torch is heavy and optional; only pickle-format weights need it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SegformerConversionError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); it must hold a state dict of tensors, not a pickled model: this "
            "converter never unpickles arbitrary objects") from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items()):
        raise SegformerConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    return dict(obj)


def read_weights(directory: str) -> Tuple[Dict[str, Any], List[str]]:
    """(state dict, files read) of a transformers directory: model.safetensors (or its shards), else
    pytorch_model.bin (or its shards) through torch.load(weights_only=True)."""
    has = lambda name: os.path.isfile(os.path.join(directory, name))  # noqa: E731
    base = TRANSFORMERS_WEIGHTS
    try:
        if has(f"{base}.safetensors") or has(f"{base}.safetensors.index.json"):
            return read_state_dict(directory, base)
        if has(PICKLE_WEIGHTS):
            return _torch_load(os.path.join(directory, PICKLE_WEIGHTS)), [os.path.join(directory, PICKLE_WEIGHTS)]
        index = os.path.join(directory, PICKLE_WEIGHTS + ".index.json")
        if os.path.isfile(index):
            weight_map = read_json(index, "sharded pytorch_model.bin weights")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, Mapping) else None
            if not isinstance(weight_map, Mapping) or not weight_map:
                raise SegformerConversionError(f"{index} has no weight_map")
            files = [os.path.join(directory, s) for s in sorted(set(weight_map.values()))]
            state: Dict[str, Any] = {}
            for path in files:
                if not os.path.isfile(path):
                    raise SegformerConversionError(f"{index} names a shard that is missing: {path}")
                for key, value in _torch_load(path).items():
                    if key in state:
                        raise SegformerConversionError(f"{path}: tensor {key!r} appears in two shards")
                    state[key] = value
            return state, files
    except PipelineConvertError as e:
        raise SegformerConversionError(str(e)) from None
    raise SegformerConversionError(f"{directory} has no weights: neither {base}.safetensors nor {PICKLE_WEIGHTS} "
                                   "(or their sharded index)")


def load_transformers_segformer(directory: str, image_mean: Optional[Sequence[float]] = None,
                                image_std: Optional[Sequence[float]] = None,
                                **overrides) -> Tuple[SegformerConfig, Dict[str, Any]]:
    """(SegformerConfig, {"params", "batch_stats"}) of a local transformers SegformerForSemanticSegmentation
    directory. The image normalisation comes from `image_mean` / `image_std` if given, else from the
    directory's preprocessor_config.json, else ImageNet's (SegformerImageProcessor's defaults). `overrides`
    are further SegformerConfig fields (e.g. dtype). Raises SegformerConversionError naming the directory."""
    if not os.path.isdir(directory):
        raise SegformerConversionError(f"Segformer directory {directory} does not exist or is not a directory")
    config_json = _config_json(directory)
    try:
        norm = normalization_overrides(directory, image_mean, image_std)
    except (PipelineConvertError, UperNetConversionError) as e:
        raise SegformerConversionError(f"{directory}: {e}") from None
    try:
        config = segformer_config_from_transformers(config_json, **norm, **overrides)
        state, _ = read_weights(directory)
        return config, segformer_from_torch(state, config)
    except SegformerConversionError as e:
        raise SegformerConversionError(f"{directory}: {e}") from None


def _config_json(directory: str) -> Mapping[str, Any]:
    try:
        config_json = read_json(os.path.join(directory, "config.json"), "Segformer config")
    except PipelineConvertError as e:
        raise SegformerConversionError(str(e)) from None
    if not isinstance(config_json, Mapping):
        raise SegformerConversionError(f"{directory}/config.json does not hold a config object")
    return config_json


def convert(source_dir: str, out_dir: str, image_mean: Optional[Sequence[float]] = None,
            image_std: Optional[Sequence[float]] = None, overwrite: bool = False,
            log: Callable[[str], None] = print) -> SegformerConfig:
    """Writes `source_dir` (a transformers SegformerForSemanticSegmentation directory) as the sdsup model
    directory `out_dir` (kind "segformer_segmenter"), e.g. for --config.evalseg.pretrained=OUT."""
    if os.path.exists(os.path.join(out_dir, model_io.PARAMS_FILE)) and not overwrite:
        raise SegformerConversionError(f"{out_dir} already holds a model; pass --overwrite to replace it")
    config, variables = load_transformers_segformer(source_dir, image_mean=image_mean, image_std=image_std)
    log(f"{source_dir}: Segformer stages {config.hidden_sizes} x {config.depths}, decoder "
        f"{config.decoder_hidden_size}, {config.num_classes} classes, image mean {config.image_mean} std "
        f"{config.image_std}")
    source = {"format": f"transformers {ARCHITECTURE}", "directory": os.path.basename(os.path.normpath(source_dir))}
    labels = labels_from_transformers(_config_json(source_dir))
    model_io.save(out_dir, KIND, config, variables, extra={"source": source, "labels": labels})
    return config
