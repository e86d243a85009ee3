"""`python -m sdsup.convert export`: an imported directory or a training workdir -> a diffusers pipeline directory.

An imported directory (`sdsup.convert.importer`) or a training workdir
(`config.json` + `vae/model`, `ldm/unet`, `ldm/text_encoder`, optional
`control/controlnet`) becomes a diffusers directory that loads offline with
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
(`sdsup.convert.scheduler_config`: matching `sdsup.diffusion.samplers.ddim_sample`,
leading spacing, steps_offset 1, set_alpha_to_one false, no clipping), or for
an imported directory its copied scheduler. A class-embedding ControlNet is
exported with conditioning_channels = D, next to the per-class vectors and
the recipe (`write_class_embedding_recipe`) and `layout_pipeline.py`, a
denoising loop over the exported components that takes a label map. The
README.md and layout_pipeline.py written next to the models come from
`sdsup/convert/templates/`.

OUT appears whole or not at all (`sdsup.convert.pipeline_files`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from safetensors import safe_open

from sdsup.convert import templates
from sdsup.convert.clip_text import clip_text_config_to_transformers, clip_text_to_torch
from sdsup.convert.controlnet import (
    CLASS_EMBEDDINGS_KEY,
    CLASS_EMBEDDINGS_NAME,
    save_pretrained_controlnet,
    write_class_embedding_recipe,
)
from sdsup.convert.pipeline_files import (
    EXPORT_INFO,
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
from sdsup.convert.safetensors_io import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, save_state_dict
from sdsup.convert.scheduler_config import ddim_scheduler_config, diffusion_from_scheduler
from sdsup.convert.torch_layout import ConversionError
from sdsup.convert.unet import unet_config_to_diffusers, unet_to_torch
from sdsup.convert.vae import vae_config_to_diffusers, vae_to_torch
from sdsup.convert.versions import diffusers_version, transformers_version
from sdsup.data import registry as dataset_registry
from sdsup.data import tokenizers as sdsup_tokenizers
from sdsup.data.tokenizers import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, WordTokenizer, _WORD
from sdsup import config_lib
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.workdir import CLASS_TABLE_FILE, CONFIG_FILE, Workdir, check_recorded_files

# Class names of the exported components in model_index.json.
DIFFUSERS_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "controlnet": "ControlNetModel",
}


# ---------------------------------------------------------------------------
# Sources.


class ExportSource:
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
    if not os.path.isdir(directory):
        raise PipelineConvertError(f"{what}: {directory} not found")
    try:
        got, config, params, _ = model_io.load(directory)
    except model_io.ModelFileError as e:
        raise PipelineConvertError(f"{what}: {one_line(e)}") from e
    if got != kind:
        raise PipelineConvertError(f"{what}: {directory} holds a {got}, not a {kind}")
    return config, params


def _source_from_imported(root: str) -> ExportSource:
    src = ExportSource("imported", root)
    manifest = read_json(os.path.join(root, MANIFEST), "manifest")
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
        src.scheduler_config = read_json(os.path.join(src.scheduler_dir, "scheduler_config.json"), "scheduler")
    elif manifest.get("diffusion"):
        src.scheduler_config = ddim_scheduler_config(manifest["diffusion"])
    else:
        src.scheduler_config = ddim_scheduler_config({})
        src.notes.append("no scheduler was imported: wrote Stable Diffusion 1.5's DDIM schedule")
    if "controlnet" in src.models and src.models["controlnet"][0].layout_encoding == "class_embedding":
        _class_embeddings_from_dir(src, src.model_dirs["controlnet"])
    return src


def _class_embeddings_from_dir(src: ExportSource, directory: str) -> None:
    path = os.path.join(directory, CLASS_EMBEDDINGS_NAME)
    if not os.path.isfile(path):
        src.notes.append("the class-embedding ControlNet came without per-class vectors: no recipe written")
        return
    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            src.class_table = f.get_tensor(CLASS_EMBEDDINGS_KEY)
    except Exception as e:
        raise PipelineConvertError(f"cannot read {path}: {type(e).__name__}: {one_line(e)}") from e
    names_path = os.path.join(directory, "class_names.json")
    names = read_json(names_path, "class names") if os.path.isfile(names_path) else json.loads(
        meta.get("class_names", "null"))
    src.class_names = list(names) if names else [f"class_{i}" for i in range(src.class_table.shape[0])]
    src.ignore_id = json.loads(meta.get("ignore_id", "null"))
    src.class_source = "carried over from the imported ControlNet"


def _source_from_workdir(root: str) -> ExportSource:
    """What to export from a training workdir: its layout (`config.json`, `vae/model`, `ldm/unet`,
    `ldm/text_encoder`, `control/unet`, `control/controlnet`, `control/class_table.npy`) read here, in one place."""
    src = ExportSource("workdir", root)
    workdir = Workdir(root)
    run = read_json(workdir.file(CONFIG_FILE), "the run's config")
    if not isinstance(run, dict):
        raise PipelineConvertError(f"{root}/config.json is not a JSON object")
    run = config_lib.upgrade(run)  # a workdir written before config keys moved
    # A control stage that fine-tuned UNet parts (control.unet_trainable) leaves the UNet its conditioner needs.
    unet_at = ("control", "unet") if os.path.isdir(workdir.model_dir("control", "unet")) else ("ldm", "unet")
    for name, (stage, item) in (("vae", ("vae", "model")), ("unet", unet_at), ("text_encoder", ("ldm", "text_encoder"))):
        path = workdir.model_dir(stage, item)
        if not os.path.isdir(path):
            raise PipelineConvertError(f"{name}: {path} not found (has stage {stage!r} finished?)")
        check_recorded_files(path, stage)  # a model file damaged after its stage finished is never exported
        src.models[name] = _load_model(path, name, name)
        src.model_dirs[name] = path
    cn_dir = workdir.model_dir("control", "controlnet")
    if os.path.isdir(cn_dir):
        check_recorded_files(cn_dir, "control")
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
        try:
            tok = sdsup_tokenizers.build("scenes_words", max_length=src.max_length, path=path)
        except (OSError, SdsupError) as e:
            raise PipelineConvertError(f"tokenizer: {one_line(e)}") from e
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
        try:
            spec = dataset_registry.get(data_name)
        except SdsupError:
            src.notes.append(f"dataset {data_name!r} is not registered: class names are 'class_<id>'")
    if spec is not None:
        src.palette = [list(c) for c in spec.palette]
        src.class_names = list(spec.class_names)
        src.ignore_id = int(spec.ignore_id)
    if "controlnet" in src.models and src.models["controlnet"][0].layout_encoding == "class_embedding":
        table_path = os.path.join(workdir.stage_dir("control"), CLASS_TABLE_FILE)
        if not os.path.isfile(table_path):
            raise PipelineConvertError(f"controlnet: {table_path} not found (the class-embedding table)")
        check_recorded_files(table_path, "control")
        try:
            table = np.load(table_path, allow_pickle=False)
        except Exception as e:
            raise PipelineConvertError(f"cannot read {table_path}: {type(e).__name__}: {one_line(e)}") from e
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


# ---------------------------------------------------------------------------
# Writers.


def _write_diffusers_model(directory: str, name: str, config: Any, params: Any) -> None:
    os.makedirs(directory, exist_ok=True)
    if name == "unet":
        state, cfg = unet_to_torch(params, config), unet_config_to_diffusers(config)
    elif name == "vae":
        state, cfg = vae_to_torch(params, config), vae_config_to_diffusers(config)
    else:  # pragma: no cover
        raise PipelineConvertError(f"unknown diffusers model {name!r}")
    write_json(os.path.join(directory, "config.json"),
               {"_class_name": DIFFUSERS_CLASSES[name], "_diffusers_version": diffusers_version(), **cfg})
    save_state_dict(state, os.path.join(directory, DIFFUSERS_WEIGHTS + ".safetensors"))


def _write_text_encoder(directory: str, config: Any, params: Any, use_attention_mask: bool) -> None:
    os.makedirs(directory, exist_ok=True)
    cfg = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "dtype": "float32",
        "transformers_version": transformers_version(),
        **clip_text_config_to_transformers(config),
    }
    if use_attention_mask:
        cfg["use_attention_mask"] = True
    write_json(os.path.join(directory, "config.json"), cfg)
    save_state_dict(clip_text_to_torch(params, config),
                      os.path.join(directory, TRANSFORMERS_WEIGHTS + ".safetensors"))


def write_word_tokenizer(directory: str, vocab: Sequence[str], max_length: int) -> None:
    """sdsup's WordTokenizer as a `tokenizers` WordLevel tokenizer (PreTrainedTokenizerFast) + vocab.txt.

    `PreTrainedTokenizerFast.from_pretrained(directory)(text, padding="max_length",
    max_length=max_length, truncation=True)["input_ids"]` equals
    `WordTokenizer(vocab, max_length).encode(text)`.
    """
    from tokenizers import (  # deferred: only word-level exports need the tokenizers library
        Regex, Tokenizer, models, normalizers, pre_tokenizers, processors)

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
    write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(max_length),
        "padding_side": "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        **specials,
    })
    write_json(os.path.join(directory, "special_tokens_map.json"), specials)
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")


def model_index(controlnet: bool, tokenizer_class: str, scheduler_class: str) -> Dict[str, Any]:
    """The model_index.json of a StableDiffusion(ControlNet)Pipeline, as diffusers' save_pretrained writes it."""
    index: Dict[str, Any] = {
        "_class_name": "StableDiffusionControlNetPipeline" if controlnet else "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version(),
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
    log: Log = quiet,
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
    if same_or_nested(source, out):
        raise PipelineConvertError(f"--out {out} must be outside --from {source} (and not contain it)")
    src = _source_from_imported(source) if kind == "imported" else _source_from_workdir(source)
    has_cn = "controlnet" in src.models

    sched_cfg = dict(src.scheduler_config or {})
    copy_scheduler = src.scheduler_dir is not None and scheduler == "auto"
    if scheduler == "ddim" and src.scheduler_dir is not None:
        diffusion = diffusion_from_scheduler(sched_cfg)
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
    with Staging(out, overwrite) as staging:
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
            raise PipelineConvertError(f"export failed: {type(e).__name__}: {one_line(e)}") from e

        tok_dir = os.path.join(root, "tokenizer")
        if src.tokenizer_dir:
            shutil.copytree(src.tokenizer_dir, tok_dir)
        else:
            write_word_tokenizer(tok_dir, src.word_vocab, src.max_length)

        if copy_scheduler:
            shutil.copytree(src.scheduler_dir, os.path.join(root, "scheduler"))
        else:
            os.makedirs(os.path.join(root, "scheduler"))
            write_json(os.path.join(root, "scheduler", "scheduler_config.json"), sched_cfg)

        if has_cn and cn_config.layout_encoding == "class_embedding" and src.class_table is not None:
            paths = write_class_embedding_recipe(os.path.join(root, "controlnet"), src.class_table, src.class_names,
                                                 src.ignore_id, source=src.class_source)
            summary["class_embedding_recipe"] = {k: os.path.relpath(v, root) for k, v in paths.items()}
            with open(os.path.join(root, "layout_pipeline.py"), "w", encoding="utf-8") as f:
                f.write(templates.read("layout_pipeline.py.template"))
        if has_cn and cn_config.layout_encoding == "colour" and src.palette is not None:
            write_json(os.path.join(root, "controlnet", "palette.json"),
                       {"class_names": src.class_names, "palette_rgb": src.palette, "ignore_id": src.ignore_id,
                        "ignore_colour": [0, 0, 0]})

        write_json(os.path.join(root, "model_index.json"), model_index(has_cn, src.tokenizer_class, scheduler_class))
        with open(os.path.join(root, "README.md"), "w", encoding="utf-8") as f:
            f.write(_export_readme(src, summary))
        write_json(os.path.join(root, EXPORT_INFO), summary)
        staging.commit()
    return summary


# ---------------------------------------------------------------------------
# Documentation written next to an export.


def _readme_part(name: str, **values) -> str:
    """templates/export_readme/`name`.md filled in, without its final newline."""
    return templates.fill(f"export_readme/{name}.md", **values).removesuffix("\n")


def _export_readme(src: ExportSource, summary: Mapping[str, Any]) -> str:
    """The README.md of an export: which scheduler and tokenizer it has, how to condition it on a layout."""
    if summary["scheduler"] == "copied":
        scheduler = [_readme_part("scheduler_copied")]
    else:
        scheduler = [_readme_part("scheduler_ddim")]
        if src.sampling:
            scheduler.append(_readme_part("scheduler_ddim_sampling", steps=src.sampling.get("steps"),
                                          guidance=src.sampling.get("guidance"), eta=src.sampling.get("eta")))
    if src.word_vocab is not None:
        tokenizer = [_readme_part("tokenizer_word_level", max_length=src.max_length)]
    else:
        tokenizer = [_readme_part("tokenizer_copied", tokenizer_class=src.tokenizer_class)]
        if src.use_attention_mask:
            tokenizer.append(_readme_part("tokenizer_attention_mask"))
    sections = []
    if summary.get("layout_encoding") == "colour":
        layout = [_readme_part("layout_colour")]
        if src.palette is not None:
            layout.append(_readme_part("layout_colour_palette"))
        sections.append("\n".join(layout))
    elif summary.get("layout_encoding") == "class_embedding":
        sections.append(_readme_part(
            "layout_class_embedding", channels=src.models["controlnet"][0].conditioning_channels,
            steps=src.sampling.get("steps", 25), guidance=src.sampling.get("guidance", 3.0),
            conditioning_scale=src.conditioning_scale))
    if not src.models.get("controlnet"):
        sections.append(_readme_part("no_controlnet"))
    if src.notes:
        sections.append(_readme_part("notes", notes="\n".join(f"- {n}" for n in src.notes)))
    return templates.fill(
        "export_readme/README.md", source=summary["source"], source_kind=summary["source_kind"],
        pipeline=summary["pipeline"], scheduler="\n".join(scheduler), tokenizer="\n".join(tokenizer),
        sections="".join("\n\n" + s for s in sections))
