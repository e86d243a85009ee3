"""Checks a config before anything is built or compiled.

`ml_collections` with `lock_config=True` already rejects unknown keys and
wrongly typed overrides while flags are parsed; `validate` checks the values
(ranges, names, combinations) and raises a ConfigError naming the key.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from typing import Any

import ml_collections

from sdsup.data import registry
from sdsup.data.pipeline import RESIZE_MODES
from sdsup.diffusion.masked import UPSAMPLE_METHODS
from sdsup.errors import ConfigError

# Every stage a config may list, in the order they can run (`sdsup.stages` implements each).
STAGES = ("data", "vae", "ldm", "layout", "planner", "discriminator", "control", "evalseg", "evaluate")
# Image samplers `config.sampling.solver` may name (`sdsup.pipelines`).
SOLVERS = ("ddim", "dpm_solver_pp_2m")
# Keys that moved: old key -> new key. A user's override of an old key fails naming the new one;
# `upgrade` carries a saved config (an old workdir's config.json) over.
RENAMED = {
    "control.discriminator": "discriminator.model",
}
# Keys that were dropped, with the reason given to a user who still sets them.
REMOVED = {
    "mesh.tensor": "sdsup shards over the data and fsdp mesh axes only; drop mesh.tensor",
}


def _require(cond: bool, key: str, message: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config.{key} {message}, got {value!r}")


def _positive_int(config, key: str) -> None:
    value = _get(config, key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
             "must be a positive integer", value)


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"config.{key} is missing")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first bad value, naming its key."""
    stage_names = tuple(_get(config, "stages"))
    _require(len(stage_names) > 0, "stages", "must list at least one stage", stage_names)
    for name in stage_names:
        _require(name in STAGES, "stages", f"has unknown stage {name!r} (known: {list(STAGES)})", stage_names)
    _require(len(set(stage_names)) == len(stage_names), "stages", "lists a stage twice", stage_names)
    if "pretrained" in config:  # configs/aldm.py: Stable Diffusion replaces the vae and ldm stages
        _require(bool(config.vae.pretrained) and bool(config.ldm.pretrained), "pretrained",
                 "must name the `python -m sdsup.convert import` output of your Stable Diffusion copy", None)

    name = _get(config, "data.name")
    _require(name in registry.names(), "data.name", f"is not a registered dataset {registry.names()}", name)
    size = _get(config, "data.image_size")
    _require(isinstance(size, int) and size >= 16 and size % 8 == 0, "data.image_size",
             "must be a multiple of 8 and at least 16", size)
    if "resize_mode" in config.data:
        _require(config.data.resize_mode in RESIZE_MODES, "data.resize_mode", f"must be one of {RESIZE_MODES}",
                 config.data.resize_mode)
    if config.data.get("resize"):
        resize = tuple(config.data.resize)
        _require(len(resize) == 2 and all(isinstance(v, int) and v >= size for v in resize), "data.resize",
                 f"must be () or (H, W), each at least data.image_size={size}", resize)
    if "missing_captions" in config.data:
        _require(config.data.missing_captions in ("error", "empty"), "data.missing_captions",
                 "must be 'error' or 'empty'", config.data.missing_captions)
    workers = config.input.get("num_workers", 0)
    _require(isinstance(workers, int) and workers >= 0, "input.num_workers", "must be an integer >= 0", workers)
    for key in ("data.num_train", "data.num_validation", "data.num_test", "input.batch_size",
                "input.num_threads", "input.prefetch", "input.device_prefetch", "text.max_length"):
        _positive_int(config, key)
    _require(_get(config, "text.max_length") >= 3, "text.max_length", "must be at least 3", _get(config, "text.max_length"))
    tok = _get(config, "text.tokenizer")
    _require(tok in ("scenes_words", "clip"), "text.tokenizer", "must be 'scenes_words' or 'clip'", tok)
    if tok == "clip":
        _require(bool(_get(config, "text.tokenizer_path")), "text.tokenizer_path",
                 "must name a local CLIP tokenizer directory when text.tokenizer='clip'", None)
    for axis, size in _get(config, "mesh").items():
        _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{axis}",
                 "must be a positive integer or -1", size)
    if "evaluate" in config:
        _require(config.evaluate.get("fid_resize", "pytorch_fid") in ("pytorch_fid", "clean"), "evaluate.fid_resize",
                 "must be 'pytorch_fid' or 'clean'", config.evaluate.get("fid_resize"))
    if "control" in stage_names and config.control.get("latent_cache", False):
        resize = tuple(config.data.get("resize", ()) or ())
        _require(resize in ((), (size, size)) and config.data.get("resize_mode", "stretch") == "stretch",
                 "control.latent_cache", "needs training without random crops (data.resize=() and "
                 "data.resize_mode='stretch'): a crop drawn per step has no fixed latents", True)
    if "control" in stage_names:
        init = config.control.get("discriminator_init", "scratch")
        _require(bool(init), "control.discriminator_init",
                 "must be 'stage', 'scratch' or a segmenter directory (ALDM's: `python -m sdsup.convert csail "
                 "--fake_class`)", init)
    _positive_int(config, "preview_examples")
    if "sampling" in config:
        _positive_int(config, "sampling.steps")
        solver = config.sampling.get("solver", "ddim")
        _require(solver in SOLVERS, "sampling.solver", f"must be one of {SOLVERS}", solver)
    for stage in ("vae", "ldm", "layout", "planner", "discriminator", "control", "evalseg"):
        if stage in stage_names and stage in config:
            _validate_training_stage(config, stage)
    if "control" in stage_names and "control" in config:
        _validate_control(config)
        _validate_unet_trainable(config)
    if "discriminator" in stage_names and "discriminator" in config:
        value = config.discriminator.get("input", "image")
        _require(value in ("image", "reconstruction"), "discriminator.input", "must be 'image' or 'reconstruction'",
                 value)
    if ("discriminator" in stage_names or "control" in stage_names) and (
            "discriminator" not in config or "model" not in config.discriminator):
        raise ConfigError("config.discriminator.model is missing: the adversarial segmenter's architecture "
                          "(it was config.control.discriminator before)")
    if "layout" in stage_names and "layout" in config:
        _validate_layout(config)
    if "planner" in stage_names:
        _validate_planner(config, stage_names)
    if "evaluate" in config:
        _validate_evaluate(config)


def check_only(only, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError if `only` (sdsup.train's --only) names a stage the config does not run."""
    stage_names = tuple(_get(config, "stages"))
    for name in only or ():
        if name not in stage_names:
            raise ConfigError(f"--only names {name!r}, which is not one of config.stages {list(stage_names)}")


def _number_in(config, key: str, low: float, high: float, high_open: bool = False) -> None:
    value = _get(config, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value and (
        value < high if high_open else value <= high)
    _require(ok, key, f"must be a number in [{low}, {high}{')' if high_open else ']'}", value)


def _validate_training_stage(config, stage: str) -> None:
    section = config[stage]
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if key in section:
            _positive_int(config, f"{stage}.{key}")
    if "micro_batches" in section:
        _positive_int(config, f"{stage}.micro_batches")
        _require(section.batch_size % section.micro_batches == 0, f"{stage}.micro_batches",
                 f"must divide {stage}.batch_size={section.batch_size}", section.micro_batches)
    if "sample_every" in section:
        value = section.sample_every
        _require(isinstance(value, int) and value >= 0, f"{stage}.sample_every",
                 "must be a non-negative integer (0 = only at the end)", value)
    if "class_balance" in section:
        _number_in(config, f"{stage}.class_balance", 0.0, 1.0)
    for key in ("caption_dropout",):
        if key in section:
            _number_in(config, f"{stage}.{key}", 0.0, 1.0)
    if "ema_decay" in section:
        _number_in(config, f"{stage}.ema_decay", 0.0, 1.0, high_open=True)
    if "min_snr_gamma" in section:
        _number_in(config, f"{stage}.min_snr_gamma", 0.0, float("inf"))


def _validate_planner(config, stage_names) -> None:
    _require("planner" in config, "planner", "is missing: the planner stage's section", None)
    _require("layout" in stage_names and stage_names.index("layout") < stage_names.index("planner"), "stages",
             "must list 'layout' before 'planner' (the planner reads the layout stage's text encoder and fills "
             "its plans with the layout model)", list(stage_names))
    for key in ("num_bins", "max_per_class", "width", "depth", "heads", "shape_size", "shapes_per_class"):
        _positive_int(config, f"planner.{key}")
    _require(config.planner.width % config.planner.heads == 0, "planner.heads",
             f"must divide planner.width={config.planner.width}", config.planner.heads)
    _number_in(config, "planner.min_object_area", 0.0, 1.0)
    _number_in(config, "planner.sampling.temperature", 0.0, float("inf"))
    _number_in(config, "planner.sampling.guidance", 0.0, float("inf"))


def _validate_control(config) -> None:
    c = config.control
    _require(c.layout_encoding in ("class_embedding", "colour"), "control.layout_encoding",
             "must be 'class_embedding' or 'colour'", c.layout_encoding)
    if "class_table_norm" in c:
        _require(c.class_table_norm in ("none", "standardize"), "control.class_table_norm",
                 "must be 'none' or 'standardize'", c.class_table_norm)
    for key in ("n_lazy", "grid_steps"):
        _positive_int(config, f"control.{key}")
    _require(isinstance(c.unroll_steps, int) and 0 <= c.unroll_steps < c.grid_steps, "control.unroll_steps",
             f"must be in [0, control.grid_steps={c.grid_steps})", c.unroll_steps)
    if "unroll_stride" in c:
        _positive_int(config, "control.unroll_stride")
    for key in ("lambda_adv", "lambda_fake"):
        _number_in(config, f"control.{key}", 0.0, float("inf"))
    _require(isinstance(c.ramp_start, int) and 0 <= c.ramp_start <= c.ramp_end, "control.ramp_start",
             f"must be a non-negative integer at most control.ramp_end={c.ramp_end}", c.ramp_start)
    if "discriminator_dtype" in c:
        _require(c.discriminator_dtype in ("float32", "bfloat16"), "control.discriminator_dtype",
                 "must be 'float32' or 'bfloat16'", c.discriminator_dtype)
    init = c.get("discriminator_init", "scratch")
    _require(isinstance(init, str) and init != "", "control.discriminator_init",
             "must be 'scratch', 'stage' or a segmenter directory", init)
    if init == "stage":
        names = tuple(config.stages)
        _require("discriminator" in names and names.index("discriminator") < names.index("control"),
                 "control.discriminator_init", "is 'stage', so config.stages must run 'discriminator' before "
                 "'control'", init)


def _validate_unet_trainable(config) -> None:
    value = config.control.get("unet_trainable", "none")
    _require(value in ("none", "decoder"), "control.unet_trainable", "must be 'none' or 'decoder'", value)


def _validate_layout(config) -> None:
    c = config.layout
    for key in ("resolution", "embed_dim", "sampling.steps", "eval_examples", "eval_seeds"):
        if key.split(".")[0] in c:
            _positive_int(config, f"layout.{key}")
    size = _get(config, "data.image_size")
    _require(size % c.resolution == 0, "layout.resolution", f"must divide data.image_size={size}", c.resolution)
    _number_in(config, "layout.sampling.temperature", 0.0, float("inf"))
    if "full_mask_fraction" in c:
        _number_in(config, "layout.full_mask_fraction", 0.0, 1.0)
    _number_in(config, "layout.sampling.guidance", 0.0, float("inf"))
    if "choice_temperature" in c.sampling:
        _number_in(config, "layout.sampling.choice_temperature", 0.0, float("inf"))
    if "map_upsample" in c:
        _require(c.map_upsample in UPSAMPLE_METHODS, "layout.map_upsample", f"must be one of {UPSAMPLE_METHODS}",
                 c.map_upsample)


def _validate_evaluate(config) -> None:
    c = config.evaluate
    _require(c.split in ("test", "validation"), "evaluate.split", "must be 'test' or 'validation'", c.split)
    _require(isinstance(c.examples, int) and c.examples >= 2, "evaluate.examples",
             "must be an integer >= 2 (FID needs two samples)", c.examples)
    known = ("text_only", "control", "text_layout_image")
    bad = [v for v in c.variants if v not in known]
    _require(not bad, "evaluate.variants", f"has unknown variants {bad} (known: {known})", tuple(c.variants))


def load(path: str, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (what --config=PATH[:ARG] names)."""
    spec = importlib.util.spec_from_file_location("_sdsup_config", path)
    if spec is None:
        raise ConfigError(f"{path} is not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def renamed_key_message(key: str) -> str | None:
    """A one-line hint for an override of a key that moved or was dropped (`control.discriminator.x`), or None."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return f"config.{old} was renamed: use config.{new}{key[len(old):]}"
    for old, why in REMOVED.items():
        if key == old or key.startswith(old + "."):
            return f"config.{old} was removed: {why}"
    return None


def upgrade(raw: dict) -> dict:
    """A saved config (plain dict, e.g. an old workdir's config.json) with renamed keys moved and dropped keys removed."""
    out = copy.deepcopy(raw)
    for old, new in RENAMED.items():
        *old_parents, old_leaf = old.split(".")
        node = out
        for part in old_parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        value = node.pop(old_leaf)
        *new_parents, new_leaf = new.split(".")
        target = out
        for part in new_parents:
            target = target.setdefault(part, {})
        target.setdefault(new_leaf, value)
    for old in REMOVED:
        *parents, leaf = old.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out
