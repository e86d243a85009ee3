"""Whole pipelines: diffusers directory -> sdsup model dirs (`import`), and back (`export`).

import
  A diffusers pipeline directory (`model_index.json`, `unet/`, `vae/`,
  `text_encoder/` in transformers format, `tokenizer/`, optional
  `controlnet/` and `scheduler/`) becomes sdsup model directories
  (`sdsup.models.io`): `OUT/unet`, `OUT/vae`, `OUT/text_encoder`,
  `OUT/controlnet`; `tokenizer/` and `scheduler/` are copied as they are and
  `OUT/manifest.json` lists what was imported. OUT is what the configs take:
  `--config.vae.pretrained=OUT/vae --config.ldm.pretrained=OUT
  --config.text.tokenizer=clip --config.text.tokenizer_path=OUT/tokenizer`.

  Weights are read from safetensors only (`diffusion_pytorch_model.safetensors`
  / `model.safetensors`, sharded `*.safetensors.index.json`, or a `variant`
  such as fp16); a component that only has pickle files (.bin, .ckpt, .pt,
  .pth) is refused, never unpickled.

export
  An imported directory (as above) or a training workdir (`config.json` +
  `vae/model`, `ldm/unet`, `ldm/text_encoder`, optional `control/controlnet`)
  becomes a diffusers directory that loads offline with
  `StableDiffusionControlNetPipeline.from_pretrained(OUT, local_files_only=True)`
  (a `StableDiffusionPipeline` when there is no ControlNet). Tokenizer:
    * a CLIP tokenizer directory (imported, or a run with text.tokenizer=clip)
      is copied;
    * sdsup's word-level tokenizer (text.tokenizer=scenes_words) is written as
      a `tokenizers` WordLevel tokenizer (`PreTrainedTokenizerFast`) that gives
      exactly `WordTokenizer.encode`'s ids (lower-casing, the same word regex,
      <unk>, BOS ... EOS, truncation to max_length - 2 words, <pad> padding),
      plus the vocabulary as `tokenizer/vocab.txt`; the text encoder's config
      gets `use_attention_mask: true`, because sdsup encodes prompts with the
      padding masked, and diffusers' pipelines pass the tokenizer's mask only
      when that flag is set.
  Scheduler: a DDIMScheduler config built from the run's `diffusion` settings
  (matching `sdsup.diffusion.samplers.ddim_sample`: leading spacing,
  steps_offset 1, set_alpha_to_one false, no clipping), or for an imported
  directory its copied scheduler. A class-embedding ControlNet is exported
  with conditioning_channels = D, next to the per-class vectors and the
  recipe (`write_class_embedding_recipe`) and `layout_pipeline.py`, a
  denoising loop over the exported components that takes a label map.

Both commands build everything in a staging directory next to OUT and move it
into place only when every component converted, so a failure never leaves a
half-written OUT and nothing that was in OUT before is deleted (an existing,
non-empty OUT is refused unless `overwrite=True`, which replaces only the
entries this command writes).

Errors the user can fix raise `PipelineConvertError` (an `SdsupError`) with a
one-line message naming the file or component.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sdsup.errors import SdsupError

MANIFEST = "manifest.json"
EXPORT_INFO = "sdsup_export.json"
MANIFEST_FORMAT = "sdsup-import"
FORMAT_VERSION = 1

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "controlnet")
COPIED_COMPONENTS = ("tokenizer", "scheduler")
# What `import` needs unless told otherwise (`components=`).
REQUIRED_FOR_IMPORT = ("unet", "vae", "text_encoder", "tokenizer")

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

# sdsup schedule kind <-> diffusers beta_schedule.
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}

# Class names of the exported components in model_index.json.
DIFFUSERS_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "controlnet": "ControlNetModel",
}


class PipelineConvertError(SdsupError):
    """A missing, unreadable or unsupported input, or an output that cannot be written."""


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------
# Small helpers.


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise PipelineConvertError(f"{what}: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineConvertError(f"{what}: {path} is unreadable: {type(e).__name__}: {_one_line(e)}") from e


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 600 else text[:600] + " ..."


def _diffusers_version() -> str:
    from sdsup.convert.controlnet import _diffusers_version as version

    return version()


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:
        return "4.40.0"


def _same_or_nested(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


class _Staging:
    """A temporary directory next to `out`, moved into `out` by `commit` (entry by entry)."""

    def __init__(self, out: str, overwrite: bool):
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise PipelineConvertError(f"--out {out} exists and is not a directory")
        if os.path.isdir(self.out) and os.listdir(self.out) and not overwrite:
            raise PipelineConvertError(
                f"--out {out} exists and is not empty; choose a new directory or pass --overwrite "
                "(which replaces only the entries this command writes)")
        parent = os.path.dirname(self.out)
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.staging-", dir=parent)
        except OSError as e:
            raise PipelineConvertError(f"cannot create a staging directory next to {out}: {_one_line(e)}") from e

    def __enter__(self) -> "_Staging":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        """Moves every staged entry into `out`; an entry of the same name there is replaced."""
        if not os.path.isdir(self.out):
            os.replace(self.path, self.out)
            return
        for name in sorted(os.listdir(self.path)):
            src, dst = os.path.join(self.path, name), os.path.join(self.out, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=self.out)
                os.replace(dst, os.path.join(old, name))
                os.replace(src, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(src, dst)


# ---------------------------------------------------------------------------
# Reading diffusers / transformers weights (safetensors only).


def _weight_files(directory: str, base: str, variant: Optional[str]) -> List[str]:
    """The safetensors files holding a component's weights (one, or the shards of an index).

    With a `variant` (e.g. "fp16"), `{base}.{variant}.safetensors` (or its index); a component
    without that variant falls back to the plain file, as diffusers does.
    """
    if variant:
        stem = f"{base}.{variant}"
        if os.path.isfile(os.path.join(directory, stem + ".safetensors")) or os.path.isfile(
                os.path.join(directory, stem + ".safetensors.index.json")):
            return _weight_files(directory, stem, None)
    stem = base
    single = os.path.join(directory, stem + ".safetensors")
    if os.path.isfile(single):
        return [single]
    index = single + ".index.json"
    if os.path.isfile(index):
        meta = _read_json(index, f"sharded weights of {directory}")
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


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file

        return load_file(path)
    except Exception as e:
        first = e
    # numpy has no bfloat16: read such files through safetensors' flax loader (ml_dtypes arrays).
    try:
        from safetensors.flax import load_file as load_flax

        return {k: np.asarray(v) for k, v in load_flax(path).items()}
    except Exception:
        pass
    raise PipelineConvertError(f"cannot read {path}: {type(first).__name__}: {_one_line(first)}") from first


def read_state_dict(
    directory: str, base: str, variant: Optional[str] = None
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """(state dict of numpy arrays, files read) of a component directory; safetensors only."""
    files = _weight_files(directory, base, variant)
    state: Dict[str, np.ndarray] = {}
    for path in files:
        for key, value in _load_safetensors(path).items():
            if key in state:
                raise PipelineConvertError(f"{path}: tensor {key!r} appears in two shards")
            state[key] = value
    return state, files


def _cast(state: Dict[str, np.ndarray], dtype: Optional[str]) -> Dict[str, np.ndarray]:
    if dtype is None:
        return state
    want = np.dtype(dtype)
    return {k: (v.astype(want) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v)
            for k, v in state.items()}


# ---------------------------------------------------------------------------
# import


def _component_dir(root: str, name: str) -> str:
    return os.path.join(root, name)


def _convert_component(name: str, directory: str, variant: Optional[str], dtype: Optional[str]):
    """(kind, config, params, info) of one diffusers/transformers component directory."""
    from sdsup.convert.torch_layout import ConversionError

    config_json = _read_json(os.path.join(directory, "config.json"), name)
    if not isinstance(config_json, dict):
        raise PipelineConvertError(f"{name}: {directory}/config.json is not a JSON object")
    base = TRANSFORMERS_WEIGHTS if name == "text_encoder" else DIFFUSERS_WEIGHTS
    state, files = read_state_dict(directory, base, variant)
    source_dtypes = sorted({str(v.dtype) for v in state.values()})
    state = _cast(state, dtype)
    info: Dict[str, Any] = {"source": [os.path.relpath(f, os.path.dirname(directory)) for f in files],
                            "source_dtypes": source_dtypes}
    try:
        if name == "unet":
            from sdsup.convert.unet import unet_from_torch
            from sdsup.models.unet import UNetConfig

            config = UNetConfig.from_diffusers(config_json)
            params = unet_from_torch(state, config)
            kind = "unet"
        elif name == "vae":
            from sdsup.convert.vae import vae_from_torch
            from sdsup.models.vae import VAEConfig

            config = VAEConfig.from_diffusers(config_json)
            params = vae_from_torch(state, config)
            kind = "vae"
        elif name == "controlnet":
            from sdsup.convert.controlnet import controlnet_from_torch
            from sdsup.models.controlnet import ControlNetConfig

            config = ControlNetConfig.from_diffusers(config_json)
            params = controlnet_from_torch(state, config)
            kind = "controlnet"
            info["layout_encoding"] = config.layout_encoding
        elif name == "text_encoder":
            from sdsup.convert.clip_text import PROJECTION_KEY, clip_text_from_torch
            from sdsup.models.clip_text import CLIPTextConfig

            archs = config_json.get("architectures") or []
            if any(a not in ("CLIPTextModel", "CLIPTextModelWithProjection") for a in archs):
                raise PipelineConvertError(
                    f"text_encoder: architectures {archs} in {directory}/config.json; only CLIPTextModel is supported")
            if PROJECTION_KEY in state:  # CLIPTextModelWithProjection: the pipeline uses the text tower only
                state = {k: v for k, v in state.items() if k != PROJECTION_KEY}
                info["dropped"] = [PROJECTION_KEY]
            config = CLIPTextConfig.from_transformers(config_json)
            params = clip_text_from_torch(state, config)["params"]
            kind = "text_encoder"
            # diffusers pipelines pass the tokenizer's attention mask only when this is set (sdsup's word-level
            # exports set it); kept so that a re-export behaves the same.
            info["use_attention_mask"] = bool(config_json.get("use_attention_mask", False))
        else:  # pragma: no cover - callers only pass MODEL_COMPONENTS
            raise PipelineConvertError(f"unknown component {name!r}")
    except PipelineConvertError:
        raise
    except (ConversionError, KeyError, ValueError, TypeError) as e:
        raise PipelineConvertError(f"{name} ({directory}): {type(e).__name__}: {_one_line(e)}") from e
    info["num_params"] = int(sum(np.asarray(v).size for v in state.values()))
    return kind, config, params, info


def _diffusion_from_scheduler(config: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """sdsup's `diffusion` config section equivalent to a diffusers scheduler config, if there is one."""
    inverse = {v: k for k, v in BETA_SCHEDULES.items()}
    kind = inverse.get(config.get("beta_schedule", "linear"))
    if kind is None or config.get("trained_betas") is not None:
        return None
    return {
        "schedule": kind,
        "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
        "beta_start": float(config.get("beta_start", 0.0001)),
        "beta_end": float(config.get("beta_end", 0.02)),
        "prediction_type": config.get("prediction_type", "epsilon"),
    }


def import_pretrained(
    pretrained: str,
    out: str,
    *,
    components: Optional[Sequence[str]] = None,
    variant: Optional[str] = None,
    dtype: Optional[str] = "float32",
    overwrite: bool = False,
    log: Log = _quiet,
) -> Dict[str, Any]:
    """Converts a diffusers pipeline directory into sdsup model directories under `out`; returns the manifest.

    components: which of unet, vae, text_encoder, controlnet, tokenizer,
    scheduler to import (each must be present); None = every one present,
    with unet, vae, text_encoder and tokenizer required. dtype: cast
    floating weights to it ("float32" by default, the dtype sdsup's models
    keep their parameters in); None keeps the stored dtypes.
    """
    if not pretrained or not os.path.isdir(pretrained):
        raise PipelineConvertError(f"--pretrained {pretrained} is not a directory")
    if _same_or_nested(pretrained, out):
        raise PipelineConvertError(f"--out {out} must be outside --pretrained {pretrained} (and not contain it)")
    known = MODEL_COMPONENTS + COPIED_COMPONENTS
    index_path = os.path.join(pretrained, "model_index.json")
    model_index = _read_json(index_path, "model_index.json") if os.path.exists(index_path) else None
    if model_index is not None and not isinstance(model_index, dict):
        raise PipelineConvertError(f"{index_path} is not a JSON object")
    if model_index is None:
        log(f"note: {pretrained} has no model_index.json; going by its subdirectories")

    def present(name: str) -> bool:
        if model_index is not None and name in model_index:
            entry = model_index[name]
            if not (isinstance(entry, list) and entry and entry[0] is not None):
                return False
        return os.path.isdir(_component_dir(pretrained, name))

    if components is None:
        missing = [c for c in REQUIRED_FOR_IMPORT if not present(c)]
        if missing:
            raise PipelineConvertError(
                f"{pretrained} lacks required component(s) {', '.join(missing)} "
                f"(expected subdirectories {', '.join(REQUIRED_FOR_IMPORT)}; pass --components to import a subset)")
        wanted = [c for c in known if present(c)]
    else:
        wanted = list(dict.fromkeys(components))
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise PipelineConvertError(f"unknown component(s) {unknown}; known: {', '.join(known)}")
        missing = [c for c in wanted if not present(c)]
        if missing:
            raise PipelineConvertError(f"{pretrained} has no {', '.join(missing)} subdirectory")
    if not wanted:
        raise PipelineConvertError(f"{pretrained} has none of the components {', '.join(known)}")

    manifest: Dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "source": os.path.abspath(pretrained),
        "source_pipeline": (model_index or {}).get("_class_name"),
        "dtype": dtype,
        "components": {},
        "copied": {},
    }
    from sdsup.models import io as model_io

    # Fail fast, before converting anything: every config and weights file must be there (and not pickle).
    for name in wanted:
        if name in MODEL_COMPONENTS:
            src = _component_dir(pretrained, name)
            if not os.path.isfile(os.path.join(src, "config.json")):
                raise PipelineConvertError(f"{name}: {src}/config.json not found")
            _weight_files(src, TRANSFORMERS_WEIGHTS if name == "text_encoder" else DIFFUSERS_WEIGHTS, variant)

    with _Staging(out, overwrite) as staging:
        for name in wanted:
            src = _component_dir(pretrained, name)
            if name in MODEL_COMPONENTS:
                log(f"import {name}: {src}")
                kind, config, params, info = _convert_component(name, src, variant, dtype)
                dst = os.path.join(staging.path, name)
                model_io.save(dst, kind, config, params)
                if name == "controlnet":
                    info.update(_copy_class_embeddings(src, dst))
                manifest["components"][name] = {"kind": kind, "path": name, **info}
            else:
                log(f"copy {name}: {src}")
                entry = _check_copied(name, src, model_index)
                try:
                    shutil.copytree(src, os.path.join(staging.path, name))
                except OSError as e:
                    raise PipelineConvertError(f"cannot copy {src}: {_one_line(e)}") from e
                manifest["copied"][name] = {"path": name, **entry}
                if name == "scheduler" and entry.get("diffusion"):
                    manifest["diffusion"] = entry["diffusion"]
        manifest["usage"] = _import_usage(manifest, out)
        _write_json(os.path.join(staging.path, MANIFEST), manifest)
        staging.commit()
    return manifest


def _check_copied(name: str, src: str, model_index: Optional[dict]) -> Dict[str, Any]:
    entry: Dict[str, Any] = {}
    if model_index is not None and isinstance(model_index.get(name), list) and len(model_index[name]) == 2:
        entry["class"] = model_index[name]
    if name == "scheduler":
        cfg = _read_json(os.path.join(src, "scheduler_config.json"), "scheduler")
        if not isinstance(cfg, dict):
            raise PipelineConvertError(f"{src}/scheduler_config.json is not a JSON object")
        entry["class_name"] = cfg.get("_class_name")
        diffusion = _diffusion_from_scheduler(cfg)
        if diffusion:
            entry["diffusion"] = diffusion
    elif name == "tokenizer":
        files = set(os.listdir(src))
        if not ({"tokenizer.json"} <= files or {"vocab.json", "merges.txt"} <= files):
            raise PipelineConvertError(f"{src} holds no tokenizer (no tokenizer.json, nor vocab.json + merges.txt)")
        for fname in ("tokenizer_config.json", "tokenizer.json", "vocab.json"):
            if fname in files:
                cfg = _read_json(os.path.join(src, fname), "tokenizer")
                if fname == "tokenizer_config.json" and isinstance(cfg, dict) and cfg.get("tokenizer_class"):
                    entry["tokenizer_class"] = cfg["tokenizer_class"]
    return entry


def _copy_class_embeddings(src: str, dst: str) -> Dict[str, Any]:
    """Carries a class-embedding recipe (class_embeddings.safetensors, class_names.json) along, when present."""
    from sdsup.convert.controlnet import CLASS_EMBEDDINGS_NAME

    copied = []
    for fname in (CLASS_EMBEDDINGS_NAME, "class_names.json"):
        path = os.path.join(src, fname)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, fname))
            copied.append(fname)
    return {"class_embeddings": copied} if copied else {}


def _import_usage(manifest: Mapping[str, Any], out: str) -> List[str]:
    comps = manifest["components"]
    flags = []
    if "vae" in comps:
        flags.append(f"--config.vae.pretrained={os.path.join(out, 'vae')}")
    if "unet" in comps and "text_encoder" in comps:
        flags.append(f"--config.ldm.pretrained={out}")
    if "tokenizer" in manifest["copied"]:
        flags += ["--config.text.tokenizer=clip", f"--config.text.tokenizer_path={os.path.join(out, 'tokenizer')}"]
    return flags


# ---------------------------------------------------------------------------
# export: sources.


class _Source:
    """What an export reads: sdsup models, tokenizer, scheduler, layout extras."""

    def __init__(self, kind: str, root: str):
        self.kind = kind  # "imported" | "workdir"
        self.root = root
        self.models: Dict[str, Tuple[Any, Any]] = {}  # name -> (config, params)
        self.model_dirs: Dict[str, str] = {}
        self.tokenizer_dir: Optional[str] = None  # a directory to copy
        self.tokenizer_class: str = "CLIPTokenizer"
        self.word_vocab: Optional[List[str]] = None  # sdsup word-level tokenizer
        self.max_length: Optional[int] = None
        self.scheduler_dir: Optional[str] = None
        self.scheduler_config: Optional[Dict[str, Any]] = None
        self.class_table: Optional[np.ndarray] = None
        self.class_names: Optional[List[str]] = None
        self.ignore_id: Optional[int] = None
        self.class_source: str = ""
        self.palette: Optional[List[List[int]]] = None
        self.sampling: Dict[str, Any] = {}
        self.conditioning_scale: float = 1.0
        self.notes: List[str] = []
        self.use_attention_mask: bool = False  # written into the exported text encoder's config


def detect_source(directory: str) -> str:
    """'imported' (has manifest.json) or 'workdir' (config.json + ldm/); PipelineConvertError otherwise."""
    if not directory or not os.path.isdir(directory):
        raise PipelineConvertError(f"--from {directory} is not a directory")
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        return "imported"
    if os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(os.path.join(directory, "ldm")):
        return "workdir"
    raise PipelineConvertError(
        f"--from {directory} is neither an imported directory (no {MANIFEST}; see `python -m sdsup.convert import`) "
        f"nor a training workdir (config.json + ldm/)")


def _load_model(directory: str, kind: str, what: str):
    from sdsup.models import io as model_io

    if not os.path.isdir(directory):
        raise PipelineConvertError(f"{what}: {directory} not found")
    try:
        got, config, params, _ = model_io.load(directory)
    except model_io.ModelFileError as e:
        raise PipelineConvertError(f"{what}: {_one_line(e)}") from e
    if got != kind:
        raise PipelineConvertError(f"{what}: {directory} holds a {got}, not a {kind}")
    return config, params


def _source_from_imported(root: str) -> _Source:
    src = _Source("imported", root)
    manifest = _read_json(os.path.join(root, MANIFEST), "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PipelineConvertError(f"{root}/{MANIFEST} is not an sdsup import manifest")
    comps = manifest.get("components") or {}
    for name in ("unet", "vae", "text_encoder"):
        if name not in comps:
            raise PipelineConvertError(f"{root} has no imported {name}: a pipeline needs unet, vae and text_encoder")
    for name in MODEL_COMPONENTS:
        if name in comps:
            path = os.path.join(root, comps[name].get("path", name))
            src.models[name] = _load_model(path, name, name)
            src.model_dirs[name] = path
    src.use_attention_mask = bool(comps["text_encoder"].get("use_attention_mask", False))
    copied = manifest.get("copied") or {}
    if "tokenizer" not in copied:
        raise PipelineConvertError(f"{root} has no tokenizer (import it with the pipeline)")
    src.tokenizer_dir = os.path.join(root, copied["tokenizer"].get("path", "tokenizer"))
    if not os.path.isdir(src.tokenizer_dir):
        raise PipelineConvertError(f"tokenizer: {src.tokenizer_dir} not found")
    cls = copied["tokenizer"].get("class")
    src.tokenizer_class = cls[1] if isinstance(cls, list) and len(cls) == 2 and cls[1] else \
        copied["tokenizer"].get("tokenizer_class") or "CLIPTokenizer"
    if "scheduler" in copied:
        src.scheduler_dir = os.path.join(root, copied["scheduler"].get("path", "scheduler"))
        src.scheduler_config = _read_json(os.path.join(src.scheduler_dir, "scheduler_config.json"), "scheduler")
    elif manifest.get("diffusion"):
        src.scheduler_config = ddim_scheduler_config(manifest["diffusion"])
    else:
        src.scheduler_config = ddim_scheduler_config({})
        src.notes.append("no scheduler was imported: wrote Stable Diffusion 1.5's DDIM schedule")
    if "controlnet" in src.models and src.models["controlnet"][0].layout_encoding == "class_embedding":
        _class_embeddings_from_dir(src, src.model_dirs["controlnet"])
    return src


def _class_embeddings_from_dir(src: _Source, directory: str) -> None:
    from sdsup.convert.controlnet import CLASS_EMBEDDINGS_KEY, CLASS_EMBEDDINGS_NAME

    path = os.path.join(directory, CLASS_EMBEDDINGS_NAME)
    if not os.path.isfile(path):
        src.notes.append("the class-embedding ControlNet came without per-class vectors: no recipe written")
        return
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            src.class_table = f.get_tensor(CLASS_EMBEDDINGS_KEY)
    except Exception as e:
        raise PipelineConvertError(f"cannot read {path}: {type(e).__name__}: {_one_line(e)}") from e
    names_path = os.path.join(directory, "class_names.json")
    names = _read_json(names_path, "class names") if os.path.isfile(names_path) else json.loads(
        meta.get("class_names", "null"))
    src.class_names = list(names) if names else [f"class_{i}" for i in range(src.class_table.shape[0])]
    src.ignore_id = json.loads(meta.get("ignore_id", "null"))
    src.class_source = "carried over from the imported ControlNet"


def _source_from_workdir(root: str) -> _Source:
    src = _Source("workdir", root)
    run = _read_json(os.path.join(root, "config.json"), "the run's config")
    if not isinstance(run, dict):
        raise PipelineConvertError(f"{root}/config.json is not a JSON object")
    # A control stage that fine-tuned UNet parts (control.unet_trainable) leaves the UNet its conditioner needs.
    unet_rel = "control/unet" if os.path.isdir(os.path.join(root, "control", "unet")) else "ldm/unet"
    for name, rel in (("vae", "vae/model"), ("unet", unet_rel), ("text_encoder", "ldm/text_encoder")):
        path = os.path.join(root, rel)
        if not os.path.isdir(path):
            stage = rel.split("/")[0]
            raise PipelineConvertError(f"{name}: {path} not found (has stage {stage!r} finished?)")
        src.models[name] = _load_model(path, name, name)
        src.model_dirs[name] = path
    cn_dir = os.path.join(root, "control", "controlnet")
    if os.path.isdir(cn_dir):
        src.models["controlnet"] = _load_model(cn_dir, "controlnet", "controlnet")
        src.model_dirs["controlnet"] = cn_dir
    else:
        src.notes.append(f"{cn_dir} not found (stage 'control' not finished): exporting without a ControlNet")

    text = run.get("text") or {}
    tokenizer = text.get("tokenizer", "scenes_words")
    src.max_length = int(text.get("max_length") or src.models["text_encoder"][0].max_position_embeddings)
    path = text.get("tokenizer_path")
    path = None if path in (None, "", "None") else os.path.expanduser(str(path))
    if tokenizer == "clip":
        if not path or not os.path.isdir(path):
            raise PipelineConvertError(f"tokenizer: the run's text.tokenizer_path {path} is not a directory")
        src.tokenizer_dir, src.tokenizer_class = path, "CLIPTokenizer"
        src.notes.append(
            "sdsup encodes prompts with attention_mask = ids != pad_id; with a CLIP tokenizer (pad = EOS) diffusers' "
            "pipeline uses no mask, so its text conditioning differs slightly from sdsup's sampling")
    elif tokenizer == "scenes_words":
        from sdsup.data import tokenizers

        try:
            tok = tokenizers.build("scenes_words", max_length=src.max_length, path=path)
        except (OSError, SdsupError) as e:
            raise PipelineConvertError(f"tokenizer: {_one_line(e)}") from e
        src.word_vocab = list(tok.vocab)
        src.tokenizer_class = "PreTrainedTokenizerFast"
        src.use_attention_mask = True  # sdsup masks padding; the word tokenizer's mask is exactly ids != pad_id
        te_config = src.models["text_encoder"][0]
        if te_config.vocab_size != len(src.word_vocab):
            raise PipelineConvertError(
                f"text_encoder has vocab_size {te_config.vocab_size} but the word vocabulary has "
                f"{len(src.word_vocab)} entries")
    else:
        raise PipelineConvertError(f"the run's text.tokenizer {tokenizer!r} is not 'scenes_words' or 'clip'")

    src.scheduler_config = ddim_scheduler_config(run.get("diffusion") or {})
    src.sampling = dict(run.get("sampling") or {})
    control = run.get("control") or {}
    src.conditioning_scale = float(control.get("conditioning_scale", 1.0))

    data_name = (run.get("data") or {}).get("name")
    spec = None
    if data_name:
        from sdsup.data import registry

        try:
            spec = registry.get(data_name)
        except SdsupError:
            src.notes.append(f"dataset {data_name!r} is not registered: class names are 'class_<id>'")
    if spec is not None:
        src.palette = [list(c) for c in spec.palette]
        src.class_names = list(spec.class_names)
        src.ignore_id = int(spec.ignore_id)
    if "controlnet" in src.models and src.models["controlnet"][0].layout_encoding == "class_embedding":
        table_path = os.path.join(root, "control", "class_table.npy")
        if not os.path.isfile(table_path):
            raise PipelineConvertError(f"controlnet: {table_path} not found (the class-embedding table)")
        try:
            table = np.load(table_path, allow_pickle=False)
        except Exception as e:
            raise PipelineConvertError(f"cannot read {table_path}: {type(e).__name__}: {_one_line(e)}") from e
        d = src.models["controlnet"][0].conditioning_channels
        if table.ndim != 2 or table.shape[1] != d:
            raise PipelineConvertError(f"{table_path} has shape {table.shape}; the ControlNet takes [N, {d}]")
        src.class_table = table.astype(np.float32)
        if src.class_names is None or len(src.class_names) != table.shape[0]:
            src.class_names = [f"class_{i}" for i in range(table.shape[0])]
        template = control.get("class_prompt", "{}")
        phrases = list(spec.phrases) if spec is not None else src.class_names
        src.class_source = (
            f"the pooled output of the exported text encoder for class_prompt {template!r} filled with each class's "
            f"caption phrase ({', '.join(phrases)}), tokenized with the exported tokenizer and "
            f"attention_mask = ids != pad_id")
    return src


def ddim_scheduler_config(diffusion: Mapping[str, Any]) -> Dict[str, Any]:
    """diffusers DDIMScheduler config equal to sdsup's DDIM over the `diffusion` config section.

    Missing keys take Stable Diffusion 1.5's values. Matches
    `sdsup.diffusion.samplers.ddim_sample` (leading spacing, steps_offset 1,
    final alpha = alphas_cumprod[0], no clipping or thresholding).
    """
    kind = diffusion.get("schedule", "scaled_linear")
    if kind not in BETA_SCHEDULES:
        raise PipelineConvertError(f"diffusion.schedule {kind!r} has no diffusers equivalent; known: "
                                   f"{', '.join(BETA_SCHEDULES)}")
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": _diffusers_version(),
        "num_train_timesteps": int(diffusion.get("num_train_timesteps", 1000)),
        "beta_start": float(diffusion.get("beta_start", 0.00085)),
        "beta_end": float(diffusion.get("beta_end", 0.012)),
        "beta_schedule": BETA_SCHEDULES[kind],
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": diffusion.get("prediction_type", "epsilon"),
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }


# ---------------------------------------------------------------------------
# export: writers.


def _save_safetensors(state: Mapping[str, np.ndarray], path: str) -> None:
    import safetensors.numpy

    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path,
                                metadata={"format": "pt"})


def _write_diffusers_model(directory: str, name: str, config: Any, params: Any) -> None:
    os.makedirs(directory, exist_ok=True)
    if name == "unet":
        from sdsup.convert.unet import unet_to_torch

        state, cfg = unet_to_torch(params, config), config.to_diffusers()
    elif name == "vae":
        from sdsup.convert.vae import vae_to_torch

        state, cfg = vae_to_torch(params, config), config.to_diffusers()
    else:  # pragma: no cover
        raise PipelineConvertError(f"unknown diffusers model {name!r}")
    _write_json(os.path.join(directory, "config.json"),
                {"_class_name": DIFFUSERS_CLASSES[name], "_diffusers_version": _diffusers_version(), **cfg})
    _save_safetensors(state, os.path.join(directory, DIFFUSERS_WEIGHTS + ".safetensors"))


def _write_text_encoder(directory: str, config: Any, params: Any, use_attention_mask: bool) -> None:
    from sdsup.convert.clip_text import clip_text_to_torch

    os.makedirs(directory, exist_ok=True)
    cfg = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "dtype": "float32",
        "transformers_version": _transformers_version(),
        **config.to_transformers(),
    }
    if use_attention_mask:
        cfg["use_attention_mask"] = True
    _write_json(os.path.join(directory, "config.json"), cfg)
    _save_safetensors(clip_text_to_torch(params, config),
                      os.path.join(directory, TRANSFORMERS_WEIGHTS + ".safetensors"))


def write_word_tokenizer(directory: str, vocab: Sequence[str], max_length: int) -> None:
    """sdsup's WordTokenizer as a `tokenizers` WordLevel tokenizer (PreTrainedTokenizerFast) + vocab.txt.

    `PreTrainedTokenizerFast.from_pretrained(directory)(text, padding="max_length",
    max_length=max_length, truncation=True)["input_ids"]` equals
    `WordTokenizer(vocab, max_length).encode(text)`.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    from sdsup.data.tokenizers import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, WordTokenizer, _WORD

    WordTokenizer(vocab, max_length)  # validates the vocabulary (special tokens first, no duplicates)
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace first, then the word regex; it matches every non-space character, so nothing is left over.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])])
    for t in SPECIAL_TOKENS:
        tok.add_special_tokens([t])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(max_length),
        "padding_side": "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        **specials,
    })
    _write_json(os.path.join(directory, "special_tokens_map.json"), specials)
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")


def model_index(controlnet: bool, tokenizer_class: str, scheduler_class: str) -> Dict[str, Any]:
    """The model_index.json of a StableDiffusion(ControlNet)Pipeline, as diffusers' save_pretrained writes it."""
    index: Dict[str, Any] = {
        "_class_name": "StableDiffusionControlNetPipeline" if controlnet else "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", tokenizer_class],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if controlnet:
        index["controlnet"] = ["diffusers", "ControlNetModel"]
    return index


def export_pipeline(
    source: str,
    out: str,
    *,
    scheduler: str = "auto",
    overwrite: bool = False,
    log: Log = _quiet,
) -> Dict[str, Any]:
    """Writes a diffusers pipeline directory to `out` from an imported dir or a training workdir.

    scheduler: "auto" (an imported dir's copied scheduler, else DDIM from the
    run's diffusion settings) or "ddim" (always a DDIMScheduler config; for an
    imported dir built from the copied scheduler's betas). Returns a summary
    (also written to OUT/sdsup_export.json).
    """
    if scheduler not in ("auto", "ddim"):
        raise PipelineConvertError(f"--scheduler {scheduler!r}: expected 'auto' or 'ddim'")
    kind = detect_source(source)
    if _same_or_nested(source, out):
        raise PipelineConvertError(f"--out {out} must be outside --from {source} (and not contain it)")
    src = _source_from_imported(source) if kind == "imported" else _source_from_workdir(source)
    has_cn = "controlnet" in src.models

    sched_cfg = dict(src.scheduler_config or {})
    copy_scheduler = src.scheduler_dir is not None and scheduler == "auto"
    if scheduler == "ddim" and src.scheduler_dir is not None:
        diffusion = _diffusion_from_scheduler(sched_cfg)
        if diffusion is None:
            raise PipelineConvertError(
                f"the copied scheduler ({sched_cfg.get('beta_schedule')}, trained_betas) has no DDIM equivalent here")
        sched_cfg = ddim_scheduler_config(diffusion)
    scheduler_class = sched_cfg.get("_class_name") or "DDIMScheduler"

    summary: Dict[str, Any] = {
        "format": "sdsup-export",
        "version": FORMAT_VERSION,
        "source": os.path.abspath(source),
        "source_kind": kind,
        "pipeline": "StableDiffusionControlNetPipeline" if has_cn else "StableDiffusionPipeline",
        "components": sorted(src.models) + ["scheduler", "tokenizer"],
        "tokenizer": "copied" if src.tokenizer_dir else "word-level (sdsup WordTokenizer)",
        "scheduler": "copied" if copy_scheduler else "DDIMScheduler from the diffusion settings",
        "notes": list(src.notes),
    }
    from sdsup.convert.controlnet import save_pretrained_controlnet, write_class_embedding_recipe
    from sdsup.convert.torch_layout import ConversionError

    with _Staging(out, overwrite) as staging:
        root = staging.path
        try:
            for name in ("unet", "vae"):
                log(f"export {name}")
                _write_diffusers_model(os.path.join(root, name), name, *src.models[name])
            log("export text_encoder")
            _write_text_encoder(os.path.join(root, "text_encoder"), *src.models["text_encoder"],
                                use_attention_mask=src.use_attention_mask)
            if has_cn:
                log("export controlnet")
                cn_config, cn_params = src.models["controlnet"]
                save_pretrained_controlnet(os.path.join(root, "controlnet"), cn_params, cn_config)
                summary["layout_encoding"] = cn_config.layout_encoding
        except (ConversionError, KeyError, ValueError) as e:
            raise PipelineConvertError(f"export failed: {type(e).__name__}: {_one_line(e)}") from e

        tok_dir = os.path.join(root, "tokenizer")
        if src.tokenizer_dir:
            shutil.copytree(src.tokenizer_dir, tok_dir)
        else:
            write_word_tokenizer(tok_dir, src.word_vocab, src.max_length)

        if copy_scheduler:
            shutil.copytree(src.scheduler_dir, os.path.join(root, "scheduler"))
        else:
            os.makedirs(os.path.join(root, "scheduler"))
            _write_json(os.path.join(root, "scheduler", "scheduler_config.json"), sched_cfg)

        if has_cn and cn_config.layout_encoding == "class_embedding" and src.class_table is not None:
            paths = write_class_embedding_recipe(os.path.join(root, "controlnet"), src.class_table, src.class_names,
                                                 src.ignore_id, source=src.class_source)
            summary["class_embedding_recipe"] = {k: os.path.relpath(v, root) for k, v in paths.items()}
            with open(os.path.join(root, "layout_pipeline.py"), "w", encoding="utf-8") as f:
                f.write(LAYOUT_PIPELINE_PY)
        if has_cn and cn_config.layout_encoding == "colour" and src.palette is not None:
            _write_json(os.path.join(root, "controlnet", "palette.json"),
                        {"class_names": src.class_names, "palette_rgb": src.palette, "ignore_id": src.ignore_id,
                         "ignore_colour": [0, 0, 0]})

        _write_json(os.path.join(root, "model_index.json"), model_index(has_cn, src.tokenizer_class, scheduler_class))
        with open(os.path.join(root, "README.md"), "w", encoding="utf-8") as f:
            f.write(_export_readme(src, summary))
        _write_json(os.path.join(root, EXPORT_INFO), summary)
        staging.commit()
    return summary


# ---------------------------------------------------------------------------
# Documentation written next to an export.


def _export_readme(src: _Source, summary: Mapping[str, Any]) -> str:
    pipe_cls = summary["pipeline"]
    lines = [
        "# Stable Diffusion pipeline exported by sdsup",
        "",
        f"Exported from `{summary['source']}` ({summary['source_kind']}). Weights are safetensors in the dtype "
        "sdsup stored them (float32 unless imported with `--dtype=keep`); nothing here needs the network:",
        "",
        "```python",
        f"from diffusers import {pipe_cls}",
        f"pipe = {pipe_cls}.from_pretrained(\"path/to/this/dir\", local_files_only=True)",
        "```",
        "",
        "Each model also loads alone (`UNet2DConditionModel`, `AutoencoderKL`, `ControlNetModel` from diffusers, "
        "`CLIPTextModel` from transformers, with `subfolder=`).",
        "",
        "## Scheduler",
        "",
    ]
    if summary["scheduler"] == "copied":
        lines.append("`scheduler/` is the scheduler of the imported pipeline, unchanged.")
    else:
        lines.append(
            "`scheduler/` is a `DDIMScheduler` with the run's noise schedule; with `eta=0` it takes exactly the "
            "steps of sdsup's `ddim_sample` (leading spacing, steps_offset 1, set_alpha_to_one false, no clipping).")
        if src.sampling:
            lines.append(
                f"The run sampled with {src.sampling.get('steps')} steps, guidance {src.sampling.get('guidance')} "
                f"and eta {src.sampling.get('eta')}.")
    lines += ["", "## Tokenizer", ""]
    if src.word_vocab is not None:
        lines += [
            "This model was trained with sdsup's word-level tokenizer (`sdsup.data.tokenizers.WordTokenizer`), not "
            "CLIP's BPE. `tokenizer/` holds the same tokenizer for transformers (a `tokenizers` WordLevel model, "
            "loaded as `PreTrainedTokenizerFast`): lower-cases, splits words, numbers and punctuation with sdsup's "
            "regex, maps unknown words to `<unk>`, adds `<bos>` ... `<eos>`, truncates to "
            f"{src.max_length} ids and pads with `<pad>` (id 0) -- exactly sdsup's ids. `tokenizer/vocab.txt` is "
            "the vocabulary, one word per line, line number = id.",
            "",
            "sdsup encodes prompts with the padding masked out of attention, so `text_encoder/config.json` sets "
            "`use_attention_mask: true`, which makes diffusers' pipelines pass the tokenizer's attention mask. "
            "To build `prompt_embeds` yourself:",
            "",
            "```python",
            "ids = pipe.tokenizer(prompts, padding=\"max_length\", max_length=pipe.tokenizer.model_max_length,",
            "                     truncation=True, return_tensors=\"pt\")",
            "prompt_embeds = pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]",
            "```",
            "",
            "Only words in the vocabulary mean anything to this model; others become `<unk>`.",
        ]
    else:
        lines.append(f"`tokenizer/` is the source's tokenizer (`{src.tokenizer_class}`), copied unchanged.")
        if src.use_attention_mask:
            lines.append("`text_encoder/config.json` sets `use_attention_mask: true` (as the source did): diffusers' "
                         "pipelines pass the tokenizer's attention mask to the text encoder.")
    if summary.get("layout_encoding") == "colour":
        lines += [
            "", "## Layout conditioning", "",
            "The ControlNet takes a colour-coded label map as `image=` (RGB, values in [0, 1], at the output "
            "resolution), like `sd-controlnet-seg`.",
        ]
        if src.palette is not None:
            lines.append("`controlnet/palette.json` lists the class names and their colours (the ignore id is black).")
    elif summary.get("layout_encoding") == "class_embedding":
        lines += [
            "", "## Layout conditioning (class embeddings)", "",
            "The ControlNet takes a per-pixel class-embedding map at 1/4 of the image size "
            f"({src.models['controlnet'][0].conditioning_channels} channels), not an image. "
            "`controlnet/README.md` gives the exact recipe; `controlnet/class_embeddings.safetensors` holds the "
            "per-class vectors and `controlnet/class_names.json` the names. diffusers' pipeline resizes `image=` "
            "to the output size, so this hint cannot go through `pipe(image=...)`; `layout_pipeline.py` here runs "
            "the denoising loop (DDIM, classifier-free guidance with the layout in both branches, as sdsup "
            "samples) over the loaded pipeline's components:",
            "",
            "```python",
            "import sys; sys.path.insert(0, \"path/to/this/dir\")",
            "from layout_pipeline import generate",
            "images = generate(pipe, [\"sky over grass.\"], labels,  # labels: [B, H, W] int64 class ids",
            f"                  num_inference_steps={src.sampling.get('steps', 25)}, "
            f"guidance_scale={src.sampling.get('guidance', 3.0)}, "
            f"conditioning_scale={src.conditioning_scale})",
            "```",
        ]
    if not src.models.get("controlnet"):
        lines += ["", "There was no ControlNet to export, so this is a plain `StableDiffusionPipeline`."]
    if src.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in src.notes]
    return "\n".join(lines) + "\n"


LAYOUT_PIPELINE_PY = '''"""Sampling with a class-embedding ControlNet exported by sdsup (PyTorch, diffusers).

diffusers' StableDiffusionControlNetPipeline resizes `image=` to the output
size, so the 1/4-resolution, D-channel class-embedding hint cannot go through
it. `generate` runs the same loop as the pipeline (and as sdsup's sampler):
DDIM from the pipeline's scheduler, classifier-free guidance with the empty
prompt, the layout hint in both guidance branches.
"""

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))


def layout_to_controlnet_cond(labels, directory=os.path.join(HERE, "controlnet")):
    """[B, H, W] int class ids -> [B, D, H/4, W/4] float32 (see controlnet/README.md)."""
    import json

    from safetensors import safe_open

    path = os.path.join(directory, "class_embeddings.safetensors")
    table = load_file(path)["class_embeddings"]
    with safe_open(path, "pt") as f:
        ignore_id = json.loads((f.metadata() or {}).get("ignore_id", "null"))
    b, h, w = labels.shape
    assert h % 4 == 0 and w % 4 == 0, "H and W must be divisible by 4"
    ids = F.interpolate(labels[:, None].float(), size=(h // 4, w // 4), mode="nearest")[:, 0].long()
    valid = (ids >= 0) & (ids < table.shape[0])
    if ignore_id is not None:
        valid &= ids != ignore_id
    emb = table[ids.clamp(0, table.shape[0] - 1)]
    emb = torch.where(valid[..., None], emb, torch.zeros((), dtype=emb.dtype))
    return emb.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def generate(pipe, prompts, labels, num_inference_steps=25, guidance_scale=3.0, conditioning_scale=1.0,
             latents=None, generator=None, output_type="np"):
    """prompts (list of B str) + labels ([B, H, W] int class ids) -> images [B, H, W, 3] in [0, 1] (numpy)."""
    device = pipe.unet.device
    labels = torch.as_tensor(labels, device=device)
    b, h, w = labels.shape
    cfg = guidance_scale > 1.0
    cond, uncond = pipe.encode_prompt(list(prompts), device, 1, cfg, negative_prompt=None)
    context = torch.cat([cond, uncond]) if cfg else cond
    hint = layout_to_controlnet_cond(labels).to(device=device, dtype=pipe.controlnet.dtype)
    hint = torch.cat([hint, hint]) if cfg else hint
    f = pipe.vae_scale_factor
    shape = (b, pipe.unet.config.in_channels, h // f, w // f)
    if latents is None:
        latents = torch.randn(shape, generator=generator, device=device, dtype=pipe.unet.dtype)
    latents = latents.to(device) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    for t in pipe.scheduler.timesteps:
        x = torch.cat([latents, latents]) if cfg else latents
        x = pipe.scheduler.scale_model_input(x, t)
        down, mid = pipe.controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        out = pipe.unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
        if cfg:
            out_c, out_u = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        latents = pipe.scheduler.step(out, t, latents, return_dict=False)[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
'''
