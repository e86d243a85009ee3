"""Generation from a finished training workdir, for `sdsup.sample` (and any program that samples).

`Session.from_workdir(DIR)` rebuilds the run's config from `DIR/config.json`,
loads the finished stages' models once and generates through
`sdsup.pipelines`. `load_layout` reads a user's label map (.npy of class ids,
or a PNG holding class ids or the palette's colours) with clear errors for
everything that can be wrong with it.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from sdsup import pipelines, viz
from sdsup.data import dataset as dataset_lib
from sdsup.data import registry
from sdsup.errors import SdsupError
from sdsup.workdir import Workdir


class InferenceError(SdsupError):
    pass


def check_prompt(prompt: str) -> str:
    if prompt is None or not prompt.strip():
        raise InferenceError("the prompt is empty: give --prompt a description of the image")
    return prompt.strip()


def check_out_dir(out: str) -> None:
    """Raises InferenceError if `out` (--out) cannot become a directory of outputs: it or a parent is a file."""
    path = os.path.abspath(out)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if os.path.exists(path) and not os.path.isdir(path):
        raise InferenceError(f"--out {out}: {path} exists and is not a directory")


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
    table = {}
    for i, (r, g, b) in enumerate(palette):  # a colour used twice (ADE20K's road and skyscraper): the lower id wins
        table.setdefault(int((r << 16) | (g << 8) | b), i)
    table[0] = spec.ignore_id  # black = ignore, as viz.colorize draws it
    ids = np.full(keys.shape, -1, np.int64)
    for key, cid in table.items():
        ids[keys == key] = cid
    if (ids < 0).any():
        y, x = np.argwhere(ids < 0)[0]
        colour = tuple(int(v) for v in rgb[y, x])  # plain ints: numpy scalars print as np.uint8(...)
        raise InferenceError(f"layout {path}: colour {colour} at ({y}, {x}) is not in the {spec.name} palette")
    return ids


class Session:
    """The finished models of a workdir, loaded once, ready to generate."""

    def __init__(self, workdir: Workdir, config=None):
        self.workdir = workdir
        self.config = config if config is not None else workdir.config()
        workdir.require("ldm")
        workdir.require("vae")
        self.spec = registry.for_config(self.config.data)
        self.size = int(self.config.data.image_size)
        self.tokenizer = dataset_lib.text_tokenizer(self.config)
        self.settings = pipelines.Settings.from_config(self.config, self.tokenizer, self.spec)
        self._image_models: Optional[pipelines.ImageModels] = None
        self._layout_models: Optional[dict] = None

    @classmethod
    def from_workdir(cls, path: str) -> "Session":
        return cls(Workdir(path))

    @property
    def has_conditioner(self) -> bool:
        return self.workdir.is_done("control")

    @property
    def has_layout_model(self) -> bool:
        return self.workdir.is_done("layout")

    def image_models(self) -> pipelines.ImageModels:
        if self._image_models is None:
            self._image_models = self.workdir.image_models()
        return self._image_models

    def tokens(self, prompt: str, n: int) -> np.ndarray:
        return np.repeat(self.tokenizer.encode(check_prompt(prompt))[None], n, 0)

    def layouts(self, prompt: str, num_samples: int = 1, seed: int = 0, mode: str = "sample",
                steps: Optional[int] = None, temperature: Optional[float] = None,
                guidance: Optional[float] = None) -> np.ndarray:
        """Text -> label maps uint8 [num_samples, H, W] (H = W = the image size) from the layout stage."""
        if not self.has_layout_model:
            raise InferenceError(f"{self.workdir.path}: stage layout (text -> layout) has not finished; "
                                 "train it first")
        if steps is not None and steps < 1:
            raise InferenceError(f"--layout_steps must be at least 1, got {steps}")
        if temperature is not None and temperature < 0:
            raise InferenceError(f"--layout_temperature must be >= 0, got {temperature}")
        if self._layout_models is None:
            self._layout_models = self.workdir.layout_models()
        sampling = self.settings.layout_sampling(mode, steps, temperature, guidance)
        ids = pipelines.text_to_layout(self._layout_models, self.tokens(prompt, num_samples),
                                       jax.random.PRNGKey(seed), self.settings, sampling)
        return ids.astype(np.uint8)

    def images(self, prompt: str, layout: Optional[np.ndarray], num_samples: int = 1, seed: int = 0,
               steps: Optional[int] = None, guidance: Optional[float] = None,
               solver: Optional[str] = None) -> np.ndarray:
        """uint8 [num_samples, H, W, 3]; with `layout` ([H, W], or one map per sample [N, H, W]) through the
        conditioner."""
        tokens = self.tokens(prompt, num_samples)
        rng = jax.random.PRNGKey(seed)
        settings = self.settings.with_overrides(steps, guidance, solver)
        if layout is None:
            return pipelines.text_to_image(self.image_models(), tokens, rng, settings)
        if not self.has_conditioner:
            raise InferenceError(f"{self.workdir.path}: a layout was given but stage control has not finished")
        labels = layout if layout.ndim == 3 else np.repeat(layout[None], num_samples, 0)
        return pipelines.layout_to_image(self.image_models(), tokens, labels, rng, settings)

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
