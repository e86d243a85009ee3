"""Generation from a finished training workdir: prompts (and layouts) -> images.

`Generator.from_workdir(DIR)` rebuilds the run's config from `DIR/config.json`
and loads the finished stages' models. `load_layout` reads a user's label map
(.npy of class ids, or a PNG holding class ids or the palette's colours) with
clear errors for everything that can be wrong with it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from sdsup import parallel, stages, viz
from sdsup.data import registry
from sdsup.errors import SdsupError


class InferenceError(SdsupError):
    pass


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise InferenceError(f"{workdir} is not a training workdir: it has no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_prompt(prompt: str) -> str:
    if prompt is None or not prompt.strip():
        raise InferenceError("the prompt is empty: give --prompt a description of the image")
    return prompt.strip()


def load_layout(path: str, spec: registry.DatasetSpec, size: int) -> np.ndarray:
    """A label map [size, size] of class ids (uint8) from .npy or .png."""
    if not os.path.exists(path):
        raise InferenceError(f"layout file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            ids = np.load(path, allow_pickle=False)
        elif ext == ".png":
            img = Image.open(path)
            arr = np.asarray(img.convert("RGB") if img.mode in ("RGB", "RGBA") else img)
            ids = _colours_to_ids(arr, spec, path) if arr.ndim == 3 else arr
        else:
            raise InferenceError(f"layout {path}: expected a .npy (class ids) or .png file")
    except InferenceError:
        raise
    except (OSError, ValueError, UnidentifiedImageError) as e:
        raise InferenceError(f"cannot read layout {path}: {type(e).__name__}: {e}") from None
    ids = np.asarray(ids)
    if ids.ndim == 3 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 2:
        raise InferenceError(f"layout {path} has shape {ids.shape}; expected [H, W] class ids")
    if ids.shape != (size, size):
        raise InferenceError(f"layout {path} is {ids.shape[0]}x{ids.shape[1]}; this model needs {size}x{size}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InferenceError(f"layout {path} holds {ids.dtype} values; expected integer class ids")
    bad = sorted(set(np.unique(ids).tolist()) - set(range(spec.num_classes)) - {spec.ignore_id})
    if bad:
        raise InferenceError(f"layout {path} has ids {bad[:10]} outside the {spec.num_classes} classes "
                             f"(0..{spec.num_classes - 1}, ignore {spec.ignore_id})")
    return ids.astype(np.uint8)


def _colours_to_ids(rgb: np.ndarray, spec, path: str) -> np.ndarray:
    palette = spec.palette_array.astype(np.int64)
    keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(palette)}
    table[0] = spec.ignore_id  # black = ignore, as viz.colorize draws it
    ids = np.full(keys.shape, -1, np.int64)
    for key, cid in table.items():
        ids[keys == key] = cid
    if (ids < 0).any():
        y, x = np.argwhere(ids < 0)[0]
        raise InferenceError(f"layout {path}: colour {tuple(rgb[y, x])} at ({y}, {x}) is not in the "
                             f"{spec.name} palette")
    return ids


class Generator:
    """Finished models of a workdir, ready to generate."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
        self.ctx = stages.Context(config=config, workdir=workdir, mesh=mesh)
        self.spec = registry.get(config.data.name)
        self.size = int(config.data.image_size)
        for name, what in (("ldm", "the text-to-image model"), ("vae", "the autoencoder")):
            if not os.path.exists(stages.done_marker(workdir, name)):
                raise InferenceError(f"{workdir}: stage {name} ({what}) has not finished; train it first")

    @classmethod
    def from_workdir(cls, workdir: str) -> "Generator":
        return cls(load_config(workdir), workdir)

    @property
    def has_conditioner(self) -> bool:
        return os.path.exists(stages.done_marker(self.workdir, "control"))

    @property
    def has_layout_model(self) -> bool:
        return os.path.exists(stages.done_marker(self.workdir, "layout"))

    def layouts(self, prompt: str, num_samples: int = 1, seed: int = 0, mode: str = "sample",
                steps: Optional[int] = None, temperature: Optional[float] = None,
                guidance: Optional[float] = None) -> np.ndarray:
        """Text -> label maps uint8 [num_samples, H, W] (H = W = the image size) from the layout stage."""
        from sdsup.stages import layout

        if not self.has_layout_model:
            raise InferenceError(f"{self.workdir}: stage layout (text -> layout) has not finished; train it first")
        if steps is not None and steps < 1:
            raise InferenceError(f"--layout_steps must be at least 1, got {steps}")
        if temperature is not None and temperature < 0:
            raise InferenceError(f"--layout_temperature must be >= 0, got {temperature}")
        if "layout_models" not in self.ctx.cache:
            self.ctx.cache["layout_models"] = layout.load_models(self.ctx)
        ids = layout.generate(self.ctx, self.ctx.cache["layout_models"], self.tokens(prompt, num_samples),
                              jax.random.PRNGKey(seed), mode=mode, steps=steps, temperature=temperature,
                              guidance=guidance)
        return ids.astype(np.uint8)

    def tokens(self, prompt: str, n: int) -> np.ndarray:
        from sdsup.stages import common

        return np.repeat(common.tokenizer(self.ctx).encode(check_prompt(prompt))[None], n, 0)

    def images(self, prompt: str, layout: Optional[np.ndarray], num_samples: int = 1, seed: int = 0,
               steps: Optional[int] = None, guidance: Optional[float] = None) -> np.ndarray:
        """uint8 [num_samples, H, W, 3]."""
        from sdsup.stages import control, ldm

        tokens = self.tokens(prompt, num_samples)
        rng = jax.random.PRNGKey(seed)
        if steps is not None:
            self.config.sampling.steps = int(steps)
        if layout is not None:
            if not self.has_conditioner:
                raise InferenceError(f"{self.workdir}: a layout was given but stage control has not finished")
            # One map for every sample, or one map per sample ([N, H, W], e.g. from `layouts`).
            labels = layout if layout.ndim == 3 else np.repeat(layout[None], num_samples, 0)
            return control.generate(self.ctx, tokens, labels, rng, guidance=guidance)
        vae_config, vae_params = self._vae()
        models = ldm.load(self.ctx)
        from sdsup.models.clip_text import CLIPTextTransformer
        from sdsup.models.unet import UNet2DConditionModel
        from sdsup.models.vae import AutoencoderKL

        params = {"unet": models["unet"][1], "text_encoder": models["text_encoder"][1]}
        return ldm.generate(self.ctx, UNet2DConditionModel(models["unet"][0]),
                            CLIPTextTransformer(models["text_encoder"][0]), AutoencoderKL(vae_config), params,
                            vae_params, ldm.noise_schedule(self.ctx), tokens, rng, guidance=guidance)

    def _vae(self):
        from sdsup.stages import vae

        return vae.load(self.ctx)

    def save(self, out: str, images: np.ndarray, layout: Optional[np.ndarray] = None, prompt: str = "") -> list:
        os.makedirs(out, exist_ok=True)
        paths = []
        for i, img in enumerate(images):
            path = os.path.join(out, f"image_{i}.png")
            viz.save_png(img, path)
            paths.append(path)
        if layout is not None:
            np.save(os.path.join(out, "layout.npy"), layout)
            rows = [{"caption": prompt, "panels": [layout]}]
            viz.save_png(viz.captioned_grid(rows, self.spec.class_names, self.spec.palette, self.spec.ignore_id),
                         os.path.join(out, "layout.png"))
        return paths

    def save_layouts(self, out: str, layouts: np.ndarray, prompt: str = "") -> list:
        """OUT/layout_<i>.npy (class ids) and OUT/layout_<i>.png (colour, with legend) per generated map."""
        os.makedirs(out, exist_ok=True)
        paths = []
        for i, ids in enumerate(layouts):
            npy, png = os.path.join(out, f"layout_{i}.npy"), os.path.join(out, f"layout_{i}.png")
            np.save(npy, ids)
            viz.save_png(viz.captioned_grid([{"caption": prompt, "panels": [ids]}], self.spec.class_names,
                                            self.spec.palette, self.spec.ignore_id), png)
            paths += [npy, png]
        return paths
