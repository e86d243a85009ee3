"""`python -m sdsup.convert import`: a diffusers pipeline directory -> sdsup model directories.

A diffusers pipeline directory (`model_index.json`, `unet/`, `vae/`,
`text_encoder/` in transformers format, `tokenizer/`, optional
`controlnet/` and `scheduler/`) becomes sdsup model directories
(`sdsup.models.io`): `OUT/unet`, `OUT/vae`, `OUT/text_encoder`,
`OUT/controlnet`; `tokenizer/` and `scheduler/` are copied as they are and
`OUT/manifest.json` lists what was imported. OUT is what the configs take:
`--config.vae.pretrained=OUT/vae --config.ldm.pretrained=OUT
--config.text.tokenizer=clip --config.text.tokenizer_path=OUT/tokenizer`.

Weights are read from safetensors only (`sdsup.convert.safetensors_io`:
`diffusion_pytorch_model.safetensors` / `model.safetensors`, sharded
`*.safetensors.index.json`, or a `variant` such as fp16); a component that
only has pickle files (.bin, .ckpt, .pt, .pth) is refused, never unpickled.
OUT appears whole or not at all (`sdsup.convert.pipeline_files`).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from sdsup.convert.clip_text import PROJECTION_KEY, clip_text_config_from_transformers, clip_text_from_torch
from sdsup.convert.controlnet import CLASS_EMBEDDINGS_NAME, controlnet_config_from_diffusers, controlnet_from_torch
from sdsup.convert.pipeline_files import (
    COPIED_COMPONENTS,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_FORMAT,
    MODEL_COMPONENTS,
    Log,
    PipelineConvertError,
    Staging,
    one_line,
    quiet,
    read_json,
    same_or_nested,
    write_json,
)
from sdsup.convert.safetensors_io import (
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    cast_floating,
    read_state_dict,
    weight_files,
)
from sdsup.convert.scheduler_config import diffusion_from_scheduler
from sdsup.convert.torch_layout import ConversionError
from sdsup.convert.unet import unet_config_from_diffusers, unet_from_torch
from sdsup.convert.vae import vae_config_from_diffusers, vae_from_torch
from sdsup.models import io as model_io

# What `import` needs unless told otherwise (`components=`).
REQUIRED_FOR_IMPORT = ("unet", "vae", "text_encoder", "tokenizer")


def _component_dir(root: str, name: str) -> str:
    return os.path.join(root, name)



def _convert_component(name: str, directory: str, variant: Optional[str], dtype: Optional[str]):
    """(kind, config, params, info) of one diffusers/transformers component directory."""
    config_json = read_json(os.path.join(directory, "config.json"), name)
    if not isinstance(config_json, dict):
        raise PipelineConvertError(f"{name}: {directory}/config.json is not a JSON object")
    base = TRANSFORMERS_WEIGHTS if name == "text_encoder" else DIFFUSERS_WEIGHTS
    state, files = read_state_dict(directory, base, variant)
    source_dtypes = sorted({str(v.dtype) for v in state.values()})
    state = cast_floating(state, dtype)
    info: Dict[str, Any] = {"source": [os.path.relpath(f, os.path.dirname(directory)) for f in files],
                            "source_dtypes": source_dtypes}
    try:
        if name == "unet":
            config = unet_config_from_diffusers(config_json)
            params = unet_from_torch(state, config)
            kind = "unet"
        elif name == "vae":
            config = vae_config_from_diffusers(config_json)
            params = vae_from_torch(state, config)
            kind = "vae"
        elif name == "controlnet":
            config = controlnet_config_from_diffusers(config_json)
            params = controlnet_from_torch(state, config)
            kind = "controlnet"
            info["layout_encoding"] = config.layout_encoding
        elif name == "text_encoder":
            archs = config_json.get("architectures") or []
            if any(a not in ("CLIPTextModel", "CLIPTextModelWithProjection") for a in archs):
                raise PipelineConvertError(
                    f"text_encoder: architectures {archs} in {directory}/config.json; only CLIPTextModel is supported")
            if PROJECTION_KEY in state:  # CLIPTextModelWithProjection: the pipeline uses the text tower only
                state = {k: v for k, v in state.items() if k != PROJECTION_KEY}
                info["dropped"] = [PROJECTION_KEY]
            config = clip_text_config_from_transformers(config_json)
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
        raise PipelineConvertError(f"{name} ({directory}): {type(e).__name__}: {one_line(e)}") from e
    info["num_params"] = int(sum(np.asarray(v).size for v in state.values()))
    return kind, config, params, info


def import_pretrained(
    pretrained: str,
    out: str,
    *,
    components: Optional[Sequence[str]] = None,
    variant: Optional[str] = None,
    dtype: Optional[str] = "float32",
    overwrite: bool = False,
    log: Log = quiet,
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
    check_floating_dtype(dtype)
    if same_or_nested(pretrained, out):
        raise PipelineConvertError(f"--out {out} must be outside --pretrained {pretrained} (and not contain it)")
    known = MODEL_COMPONENTS + COPIED_COMPONENTS
    index_path = os.path.join(pretrained, "model_index.json")
    model_index = read_json(index_path, "model_index.json") if os.path.exists(index_path) else None
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
    # Fail fast, before converting anything: every config and weights file must be there (and not pickle).
    for name in wanted:
        if name in MODEL_COMPONENTS:
            src = _component_dir(pretrained, name)
            if not os.path.isfile(os.path.join(src, "config.json")):
                raise PipelineConvertError(f"{name}: {src}/config.json not found")
            weight_files(src, TRANSFORMERS_WEIGHTS if name == "text_encoder" else DIFFUSERS_WEIGHTS, variant)

    with Staging(out, overwrite) as staging:
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
                    raise PipelineConvertError(f"cannot copy {src}: {one_line(e)}") from e
                manifest["copied"][name] = {"path": name, **entry}
                if name == "scheduler" and entry.get("diffusion"):
                    manifest["diffusion"] = entry["diffusion"]
        manifest["usage"] = _import_usage(manifest, out)
        write_json(os.path.join(staging.path, MANIFEST), manifest)
        staging.commit()
    return manifest


def check_floating_dtype(dtype: Optional[str]) -> None:
    """Raises PipelineConvertError unless `dtype` (--dtype) is None or a floating dtype numpy knows."""
    if dtype is None:
        return
    try:
        known = np.dtype(dtype)
    except TypeError:
        known = None
    if known is None or not (np.issubdtype(known, np.floating) or known.name == "bfloat16"):
        raise PipelineConvertError(f"--dtype {dtype!r} is not a floating dtype (e.g. float32, float16, bfloat16; "
                                   "'keep' keeps the stored dtypes)")


def _check_copied(name: str, src: str, model_index: Optional[dict]) -> Dict[str, Any]:
    entry: Dict[str, Any] = {}
    if model_index is not None and isinstance(model_index.get(name), list) and len(model_index[name]) == 2:
        entry["class"] = model_index[name]
    if name == "scheduler":
        cfg = read_json(os.path.join(src, "scheduler_config.json"), "scheduler")
        if not isinstance(cfg, dict):
            raise PipelineConvertError(f"{src}/scheduler_config.json is not a JSON object")
        entry["class_name"] = cfg.get("_class_name")
        diffusion = diffusion_from_scheduler(cfg)
        if diffusion:
            entry["diffusion"] = diffusion
    elif name == "tokenizer":
        files = set(os.listdir(src))
        if not ({"tokenizer.json"} <= files or {"vocab.json", "merges.txt"} <= files):
            raise PipelineConvertError(f"{src} holds no tokenizer (no tokenizer.json, nor vocab.json + merges.txt)")
        for fname in ("tokenizer_config.json", "tokenizer.json", "vocab.json"):
            if fname in files:
                cfg = read_json(os.path.join(src, fname), "tokenizer")
                if fname == "tokenizer_config.json" and isinstance(cfg, dict) and cfg.get("tokenizer_class"):
                    entry["tokenizer_class"] = cfg["tokenizer_class"]
    return entry


def _copy_class_embeddings(src: str, dst: str) -> Dict[str, Any]:
    """Carries a class-embedding recipe (class_embeddings.safetensors, class_names.json) along, when present."""
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
