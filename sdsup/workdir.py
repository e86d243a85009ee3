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
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Tuple, Union

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
    "discriminator": "the pretrained adversarial segmenter",
    "control": "the segmentation conditioner",
    "evalseg": "the evaluation segmenter",
}


# Model kinds that segment images (`model_configs.segmenter_network` builds any of them).
SEGMENTER_KINDS = ("segmenter", "drn_segmenter", "segformer_segmenter")


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
        with open(self.done_marker(name)) as f:
            return json.load(f)

    def mark_done(self, name: str, summary: dict) -> None:
        """Writes the stage's DONE.json atomically: a crash never leaves half a marker."""
        marker = self.done_marker(name)
        os.makedirs(os.path.dirname(marker), exist_ok=True)  # a stage need not write files of its own
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

    def write_config(self, text: str) -> None:
        """Writes config.json; an earlier, different one is kept as config.<n>.json."""
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

    def layout_models(self) -> dict:
        """{"layout", "text_encoder"}: the layout model and the text encoder it reads.

        That is the layout stage's own fine-tuned copy when it trained one
        (layout.train_text_encoder), else the ldm stage's.
        """
        if self.has_model("layout", "text_encoder"):
            text = self.load_model("layout", "text_encoder", "text_encoder")
        else:
            text = self.load_model("ldm", "text_encoder", "text_encoder")
        return {"layout": self.load_model("layout", "model", "layout"), "text_encoder": text}

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
    how = (f"; re-run stage {stage} (delete {os.path.join(os.path.dirname(directory), DONE_FILE)}, "
           f"then train with --only={stage})") if stage else ""
    if not os.path.exists(os.path.join(directory, model_io.CONFIG_FILE)):
        raise WorkdirError(f"{name} holds no sdsup model (no {model_io.CONFIG_FILE}){how}")
    try:
        got, config, params, _ = model_io.load(directory)
    except model_io.ModelFileError as e:
        raise WorkdirError(f"{e}{how}") from None
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and got not in kinds:
        raise WorkdirError(f"{name} holds a {got}, not a {' or a '.join(kinds)}")
    return config, params
