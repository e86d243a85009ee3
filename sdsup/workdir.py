"""A training workdir: the one place that knows where every stage leaves what.

    WORKDIR/
      config.json                  the run's config (an earlier, different one is kept as config.<n>.json)
      metrics.json, report.md      evaluation results (`sdsup.evaluation.report`)
      <stage>/DONE.json            the stage finished; its summary
      <stage>/checkpoints/         orbax checkpoints while the stage trains
      <stage>/samples/step_*.png   sample grids written during training
      data/                        preview.png, stats.json
      vae/model/                   the autoencoder
      ldm/unet/, ldm/text_encoder/ the text-conditional latent UNet and its text encoder
      layout/model/                the text -> layout model; layout/text_encoder/ when it fine-tuned its own
      discriminator/model/         the pretrained adversarial segmenter (N+1 outputs)
      control/controlnet/          the segmentation conditioner (EMA weights) and control/class_table.npy;
                                   control/unet/ when it fine-tuned UNet parts; control/discriminator/
      evalseg/model/               the evaluation segmenter
      evaluation/                  sample grids of `sdsup.evaluate`

Stages write through `save_model` and `mark_done`; everything that uses a
trained model (sampling, evaluation, export, the ablation, benchmarks) reads
through the loaders here, which name the stage to re-run when a file is
missing or damaged.

A stage's DONE.json records the size and SHA-256 of every model file the
stage left (`model_files`: each model directory's files and the control
stage's class table). The loaders check a model's files against that record
before reading them, so a file damaged or replaced after its stage finished
stops the run with an error naming the file and the stage to re-run; it is
never used. A DONE.json without the record (a workdir written before it
existed) loads unverified, as before.

A workdir belongs to one config: `write_config` refuses a config that
differs from the workdir's own in a section a finished stage was built
from (`STAGE_SECTIONS`), before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import ml_collections
import numpy as np

from sdsup import config_lib, pipelines
from sdsup.errors import SdsupError
from sdsup.models import io as model_io

CONFIG_FILE = "config.json"
DONE_FILE = "DONE.json"
CLASS_TABLE_FILE = "class_table.npy"

# What each model-holding stage is, for messages.
STAGE_ROLES = {
    "vae": "the autoencoder",
    "ldm": "the text-to-image model",
    "layout": "the text -> layout model",
    "planner": "the text -> object plan model",
    "discriminator": "the pretrained adversarial segmenter",
    "control": "the segmentation conditioner",
    "evalseg": "the evaluation segmenter",
}


# Model kinds that segment images (`model_configs.segmenter_network` builds any of them).
SEGMENTER_KINDS = ("segmenter", "drn_segmenter", "segformer_segmenter")

# DONE.json's record of the stage's model files: {path relative to the stage dir: {"bytes", "sha256"}}.
MODEL_FILES_KEY = "model_files"
# Stage subdirectories that hold no finished model (training state, pictures, caches).
UNRECORDED_DIRS = ("checkpoints", "samples", "latent_cache")

# The config sections each stage's outputs were built from: once the stage has finished, a config that changes
# one of them no longer describes the workdir (`Workdir.check_config`). Later stages also read earlier stages'
# models; those stages' own sections cover that.
STAGE_SECTIONS = {
    "data": ("data",),
    "vae": ("data", "vae"),
    "ldm": ("data", "text", "vae", "diffusion", "ldm"),
    "layout": ("data", "text", "layout"),
    "planner": ("data", "text", "layout", "planner"),
    "discriminator": ("data", "discriminator"),
    "control": ("data", "text", "vae", "diffusion", "discriminator", "control"),
    "evalseg": ("data", "evalseg"),
    "evaluate": ("evaluate",),
}
# Keys (last part) that change where things are kept or how often a stage reports, not what it makes.
BOOKKEEPING_KEYS = ("data_dir", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every")


class WorkdirError(SdsupError):
    """A workdir that lacks what was asked of it, or holds something unreadable."""


class Workdir:
    """Paths, DONE markers and model loaders of one training workdir."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))

    def __repr__(self) -> str:
        return f"Workdir({self.path!r})"

    def __fspath__(self) -> str:
        return self.path

    # -- layout ---------------------------------------------------------------------------
    def stage_dir(self, name: str, create: bool = False) -> str:
        path = os.path.join(self.path, name)
        if create:
            os.makedirs(path, exist_ok=True)
        return path

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def done_marker(self, name: str) -> str:
        return os.path.join(self.path, name, DONE_FILE)

    def is_done(self, name: str) -> bool:
        return os.path.exists(self.done_marker(name))

    def require(self, name: str) -> None:
        """Raises WorkdirError unless stage `name` has finished."""
        if not self.is_done(name):
            role = STAGE_ROLES.get(name, name)
            raise WorkdirError(f"{self.path}: stage {name} ({role}) has not finished; train it first "
                               f"(python -m sdsup.train ... --workdir={self.path} --only={name})")

    def summary(self, name: str) -> dict:
        """What stage `name` returned when it finished (DONE.json without the workdir's record of model files)."""
        with open(self.done_marker(name)) as f:
            summary = json.load(f)
        summary.pop(MODEL_FILES_KEY, None)
        return summary

    def mark_done(self, name: str, summary: dict) -> None:
        """Writes the stage's DONE.json atomically (a crash never leaves half a marker), with the size and
        SHA-256 of every model file the stage left."""
        marker = self.done_marker(name)
        os.makedirs(os.path.dirname(marker), exist_ok=True)  # a stage need not write files of its own
        record = record_model_files(os.path.dirname(marker))
        if record:
            summary = dict(summary, **{MODEL_FILES_KEY: record})
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        os.replace(tmp, marker)

    # -- config ---------------------------------------------------------------------------
    def has_config(self) -> bool:
        return os.path.isfile(self.file(CONFIG_FILE))

    def config(self) -> ml_collections.ConfigDict:
        """The run's config from config.json, with keys renamed since it was written brought up to date."""
        if not self.has_config():
            raise WorkdirError(f"{self.path} is not a training workdir: it has no {CONFIG_FILE}")
        try:
            with open(self.file(CONFIG_FILE)) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise WorkdirError(f"cannot read {self.file(CONFIG_FILE)}: {type(e).__name__}: {e}") from None
        return ml_collections.ConfigDict(config_lib.upgrade(raw))

    def check_config(self, text: str) -> None:
        """Raises WorkdirError if the config (JSON `text`) differs from this workdir's own in a section that a
        finished stage was built from; writes nothing."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise WorkdirError(f"--workdir {self.path} exists and is not a directory")
        if not self.has_config():
            return
        finished = [name for name in STAGE_SECTIONS if self.is_done(name)]
        if not finished:
            return
        ours = self.config().to_dict()  # brought up to date (config_lib.upgrade), as the stages read it
        theirs = json.loads(text)
        for name in finished:
            for section in STAGE_SECTIONS[name]:
                if section not in ours or section not in theirs:
                    continue
                for key, old, new in config_differences(ours[section], theirs[section], section):
                    raise WorkdirError(
                        f"{self.path} was trained with another config: config.{key} is {new!r} here but {old!r} in "
                        f"its {CONFIG_FILE}, and stage {name} finished with that value. Use a new --workdir, or "
                        f"re-train stage {name} and those after it (delete their DONE.json)")

    def write_config(self, text: str) -> None:
        """Writes config.json; an earlier, different one is kept as config.<n>.json.

        A config that no longer describes the finished stages is refused first (`check_config`).
        """
        self.check_config(text)
        os.makedirs(self.path, exist_ok=True)
        path = self.file(CONFIG_FILE)
        if os.path.exists(path):
            with open(path) as f:
                if f.read() == text:
                    return
            n = 1
            while os.path.exists(self.file(f"config.{n}.json")):
                n += 1
            os.replace(path, self.file(f"config.{n}.json"))
        with open(path, "w") as f:
            f.write(text)

    # -- models ---------------------------------------------------------------------------
    def model_dir(self, stage: str, name: str) -> str:
        return os.path.join(self.path, stage, name)

    def has_model(self, stage: str, name: str) -> bool:
        return os.path.exists(os.path.join(self.model_dir(stage, name), model_io.CONFIG_FILE))

    def save_model(self, stage: str, name: str, kind: str, config: Any, params: Any) -> None:
        model_io.save(self.model_dir(stage, name), kind, config, params)

    def load_model(self, stage: str, name: str, kind: Union[None, str, Sequence[str]] = None) -> Tuple[Any, Any]:
        """(config, params) of WORKDIR/<stage>/<name>; an error naming the stage to re-run if unusable."""
        return load_model_dir(self.model_dir(stage, name), kind, stage=stage)

    def vae(self):
        """(VAEConfig, params)."""
        return self.load_model("vae", "model", "vae")

    def ldm(self) -> dict:
        """{"unet": (config, params), "text_encoder": (config, params)}."""
        return {name: self.load_model("ldm", name, name) for name in ("unet", "text_encoder")}

    def layout_models(self, planner: bool = True) -> dict:
        """{"layout", "text_encoder"[, "planner"[, "planner_text_encoder"]]}: the layout model, the text
        encoder it reads and, when the planner stage has finished (and `planner`), the object planner that
        places its things (with the planner's own text encoder when it fine-tuned one).

        The text encoder is the layout stage's own fine-tuned copy when it
        trained one (layout.train_text_encoder), else the ldm stage's.
        """
        if self.has_model("layout", "text_encoder"):
            text = self.load_model("layout", "text_encoder", "text_encoder")
        else:
            text = self.load_model("ldm", "text_encoder", "text_encoder")
        models = {"layout": self.load_model("layout", "model", "layout"), "text_encoder": text}
        if planner and self.is_done("planner"):
            models["planner"] = self.load_model("planner", "model", "planner")
            if self.has_model("planner", "text_encoder"):  # planner.train_text_encoder: the planner's own copy
                models["planner_text_encoder"] = self.load_model("planner", "text_encoder", "text_encoder")
        return models

    def conditioner(self, control_dir: Optional[str] = None):
        """(ControlNetConfig, params, class table, UNet (config, params) or None) of a control stage.

        `control_dir` is a control stage's directory (default WORKDIR/control; the
        ablation keeps one per variant). The UNet is there when the stage
        fine-tuned parts of it (control.unet_trainable); images with this
        conditioner must use it instead of the ldm stage's.
        """
        directory = control_dir or self.stage_dir("control")
        config, params = load_model_dir(os.path.join(directory, "controlnet"), "controlnet", stage="control")
        table_path = os.path.join(directory, CLASS_TABLE_FILE)
        check_recorded_files(table_path, "control")
        try:
            table = np.load(table_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise WorkdirError(f"cannot read {table_path} ({type(e).__name__}: {e}); re-run stage control "
                               "(--only=control after deleting its DONE.json)") from None
        unet = None
        if os.path.exists(os.path.join(directory, "unet", model_io.CONFIG_FILE)):
            unet = load_model_dir(os.path.join(directory, "unet"), "unet", stage="control")
        return config, params, table, unet

    def has_conditioner(self, control_dir: Optional[str] = None) -> bool:
        directory = control_dir or self.stage_dir("control")
        return os.path.exists(os.path.join(directory, "controlnet", model_io.CONFIG_FILE))

    def save_conditioner(self, config: Any, params: Any, table: np.ndarray, unet: Optional[tuple] = None) -> None:
        self.save_model("control", "controlnet", "controlnet", config, params)
        if unet is not None:
            self.save_model("control", "unet", "unet", *unet)
        np.save(os.path.join(self.stage_dir("control", create=True), CLASS_TABLE_FILE), table)

    def image_models(self, control_dir: Optional[str] = None) -> pipelines.ImageModels:
        """The finished image models: ldm + vae, and the conditioner when a control stage left one.

        `control_dir` (a control stage's directory) overrides the workdir's own conditioner.
        """
        ldm = self.ldm()
        models = pipelines.ImageModels(ldm["unet"], ldm["text_encoder"], self.vae())
        if not self.has_conditioner(control_dir):
            return models
        config, params, table, unet = self.conditioner(control_dir)
        return models.with_conditioner((config, params), table, unet)

    def segmenter(self, stage: str):
        """(config, variables {params, batch_stats}) of stage "evalseg" (a UperNet or, imported, a DRN or a
        Segformer) or "discriminator"."""
        return self.load_model(stage, "model", SEGMENTER_KINDS)


def load_model_dir(directory: str, kind: Union[None, str, Sequence[str]] = None, stage: Optional[str] = None,
                   what: Optional[str] = None) -> Tuple[Any, Any]:
    """(config, params) of an sdsup model directory, checked to hold a `kind` (or one of several).

    Errors name the stage to re-run (`stage`, for a workdir's own models) or
    the config key that named the directory (`what`, e.g. "config.vae.pretrained").
    """
    name = f"{what}={directory}" if what else directory
    how = _how_to_rerun(directory, stage) if stage else ""
    if not os.path.exists(os.path.join(directory, model_io.CONFIG_FILE)):
        raise WorkdirError(f"{name} holds no sdsup model (no {model_io.CONFIG_FILE}){how}")
    if stage:
        check_recorded_files(directory, stage)
    try:
        got, config, params, _ = model_io.load(directory)
    except model_io.ModelFileError as e:
        raise WorkdirError(f"{e}{how}") from None
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and got not in kinds:
        raise WorkdirError(f"{name} holds a {got}, not a {' or a '.join(kinds)}")
    return config, params


def _how_to_rerun(path: str, stage: str) -> str:
    """"; re-run stage S (...)" for a file or model directory directly inside stage S's directory."""
    return (f"; re-run stage {stage} (delete {os.path.join(os.path.dirname(os.path.abspath(path)), DONE_FILE)}, "
            f"then train with --only={stage})")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_files(stage_dir: str) -> Iterator[str]:
    """Every file of the model directories under `stage_dir` (those holding params.safetensors) and its class
    table, as paths relative to `stage_dir`."""
    for folder, dirs, files in os.walk(stage_dir):
        dirs[:] = sorted(d for d in dirs if d not in UNRECORDED_DIRS)
        is_model = model_io.PARAMS_FILE in files
        for name in sorted(files):
            if is_model or (folder == stage_dir and name == CLASS_TABLE_FILE):
                yield os.path.relpath(os.path.join(folder, name), stage_dir)


def record_model_files(stage_dir: str) -> Dict[str, dict]:
    """{path relative to `stage_dir`: {"bytes", "sha256"}} of the stage's model files (DONE.json's record)."""
    record = {}
    for rel in _model_files(stage_dir):
        path = os.path.join(stage_dir, rel)
        record[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    return record


def check_recorded_files(path: str, stage: str) -> None:
    """Raises WorkdirError if a model directory (or file) of a finished stage differs from what its DONE.json
    recorded: a file missing, of another size, or with other bytes. Without a record (a workdir from before
    records, or no readable DONE.json) the files pass unverified."""
    path = os.path.abspath(path)
    stage_dir = os.path.dirname(path)
    marker = os.path.join(stage_dir, DONE_FILE)
    try:
        with open(marker) as f:
            record = json.load(f).get(MODEL_FILES_KEY)
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(record, dict):
        return
    prefix = os.path.relpath(path, stage_dir)
    how = _how_to_rerun(path, stage)
    for rel in sorted(record):
        if rel != prefix and not rel.startswith(prefix + os.sep):
            continue
        entry, file = record[rel], os.path.join(stage_dir, rel)
        if not os.path.isfile(file):
            raise WorkdirError(f"{file} is missing: stage {stage} left it when it finished{how}")
        size = os.path.getsize(file)
        if size != entry.get("bytes"):
            raise WorkdirError(f"{file} is {size} bytes, but stage {stage} finished with {entry.get('bytes')}: it "
                               f"was cut short or replaced since{how}")
        if _sha256(file) != entry.get("sha256"):
            raise WorkdirError(f"{file} is damaged: its bytes differ from those stage {stage} finished with "
                               f"(SHA-256 recorded in {marker}){how}")


def config_differences(ours: Any, theirs: Any, key: str) -> Iterator[Tuple[str, Any, Any]]:
    """(key, our value, their value) for every leaf both configs (plain dicts, under `key`) set to different
    values, bookkeeping keys aside.

    A key only one of them has is no difference: a workdir written before a key was added, or after one was
    dropped, still describes its stages.
    """
    if key.rsplit(".", 1)[-1] in BOOKKEEPING_KEYS:
        return
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for name in sorted(set(ours) & set(theirs)):
            yield from config_differences(ours[name], theirs[name], f"{key}.{name}")
        return
    if _plain(ours) != _plain(theirs):
        yield key, ours, theirs


def _plain(value: Any) -> Any:
    """A config value as config.json holds it (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(value, default=str))
