"""The models behind the demo page: one finished workdir, generation through `sdsup.inference`, files, progress.

Every generation goes through the `sdsup.inference.Session` calls that
`sdsup.sample` makes, so the command shown under a result reproduces it
exactly. Models run one call at a time (a lock): the cores are the limit, and
a jitted sampler's first call compiles it once. A background thread compiles
(or loads from the persistent cache) the samplers the page's first clicks
need, one at a time, so a click waits at most for the piece in progress.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import secrets
import tempfile
import threading
import time
from typing import Callable, Optional

import numpy as np
from absl import logging

from sdsup import inference, viz
from sdsup.cli import one_line
from sdsup.data import dataset as dataset_lib
from sdsup.demo import commands, layouts
from sdsup.demo.layouts import DemoError
from sdsup.evaluation import suite

SOLVERS = ("ddim", "dpm_solver_pp_2m")
LAYOUT_MODES = ("sample", "map")
MAX_IMAGES = 8
MAX_STEPS = 1000
MAX_SEED = 2 ** 31 - 1
# Files of each generation: sdsup.sample's own (image_<i>.png, layout.npy, layout.png with legend), plus these.
LAYOUT_PALETTE_FILE = "layout_palette.png"  # the map in palette colours at its size: a file --layout reads
READING_FILE = "reading_{}.png"
RESULT_FILE = "result.json"


def _integer(value, name: str, low: int, high: int) -> int:
    """A whole number from the page (a JSON number or a string of digits), in [low, high]."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemoError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise DemoError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _real(value, name: str, low: float, high: float) -> float:
    """A number from the page (a JSON number or a numeric string), finite, in [low, high]."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise DemoError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    return number


def check_prompt(prompt) -> str:
    """The page's prompt, stripped; an empty one is a message, not a traceback."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoError("the prompt is empty: describe the image first (e.g. 'sky over grass. a red house on the "
                        "left.')")
    return prompt.strip()


class Progress:
    """What the engine is doing now, for the page's progress indicator (read from another thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._task, self._phase, self._started = None, None, None

    def start(self, task: str, phase: str) -> None:
        with self._lock:
            self._task, self._phase, self._started = task, phase, time.monotonic()

    def phase(self, phase: str) -> None:
        with self._lock:
            self._phase = phase

    def finish(self) -> None:
        with self._lock:
            self._task = self._phase = self._started = None

    def snapshot(self) -> dict:
        with self._lock:
            if self._task is None:
                return {"busy": False}
            return {"busy": True, "task": self._task, "phase": self._phase,
                    "elapsed_s": round(time.monotonic() - self._started, 1)}


@dataclasses.dataclass
class GeneratedLayout:
    """A map the layout model drew, kept so that an unedited one can be traced back to its command."""

    request: commands.LayoutRequest
    ids: np.ndarray


class Engine:
    """A finished workdir's models for the page: layouts, uploads, photos, images and their readings."""

    def __init__(self, workdir: str, out: Optional[str] = None):
        self.session = inference.Session.from_workdir(workdir)
        self.workdir = self.session.workdir
        self.config = self.session.config
        self.spec, self.size, self.settings = self.session.spec, self.session.size, self.session.settings
        self.has_layout_model = self.session.has_layout_model
        self.has_conditioner = self.session.has_conditioner
        self.has_segmenter = self.workdir.is_done("evalseg")
        self.geometry = dataset_lib.geometry(self.config)
        self.out = os.path.abspath(out) if out else tempfile.mkdtemp(prefix="sdsup-demo-")
        os.makedirs(self.out, exist_ok=True)
        self.progress = Progress()
        self._models_lock = threading.Lock()
        self._segmenter = None
        self._seen_settings: set = set()  # sampler settings this process has run (the others compile first)
        self._generated: "collections.OrderedDict[str, GeneratedLayout]" = collections.OrderedDict()
        self._counter = itertools.count(1)
        self._state_lock = threading.Lock()  # the counter and the generated layouts: requests come on threads
        self._warmup = collections.OrderedDict()
        self._warmup_lock = threading.Lock()

    # -- what the page shows first ---------------------------------------------------------------
    def notices(self) -> list:
        """What this workdir cannot do, in words, so the page says it rather than failing on a click."""
        out = []
        if not self.has_layout_model:
            out.append("stage layout (text -> layout) has not finished in this workdir: no layouts from the prompt; "
                       "paint or upload one")
        if not self.has_conditioner:
            out.append("stage control (the segmentation conditioner) has not finished: images come from the prompt "
                       "alone and the layout does not steer them")
        if not self.has_segmenter:
            out.append("stage evalseg (the evaluation segmenter) has not finished: no reading of the images and no "
                       "photo segmentation")
        return out

    def info(self) -> dict:
        layout = self.settings.layout
        return {
            "workdir": self.workdir.path,
            "dataset": self.spec.name,
            "size": self.size,
            "classes": layouts.class_table(self.spec),
            "ignore_id": int(self.spec.ignore_id),
            "capabilities": {"layout": self.has_layout_model, "conditioner": self.has_conditioner,
                             "segmenter": self.has_segmenter},
            "notices": self.notices(),
            "examples": list(self.spec.novel_prompts[:8]),
            "segmenter_real_miou": self._segmenter_real_miou(),
            "defaults": {"seed": 0, "num_samples": 1, "steps": self.settings.steps,
                         "guidance": self.settings.guidance, "solver": self.settings.solver,
                         "layout_mode": "sample", "layout_steps": layout.steps,
                         "layout_temperature": layout.temperature, "layout_guidance": layout.guidance},
            "limits": {"num_samples": MAX_IMAGES, "steps": MAX_STEPS, "seed": MAX_SEED},
            "solvers": list(SOLVERS),
            "out": self.out,
        }

    def _segmenter_real_miou(self) -> Optional[float]:
        """The evaluation segmenter's mIoU on real images (metrics.json, else its stage's validation number):
        how far its reading of an image can be trusted."""
        if not self.has_segmenter:
            return None
        for path, key in ((self.workdir.file("metrics.json"), "images/real/miou"),
                          (self.workdir.done_marker("evalseg"), "val_miou_real")):
            try:
                with open(path) as f:
                    value = json.load(f).get(key)
            except (OSError, ValueError):
                continue
            if isinstance(value, (int, float)):
                return float(value)
        return None

    def status(self) -> dict:
        with self._warmup_lock:
            warmup = [{"name": name, "state": state} for name, state in self._warmup.items()]
        return {**self.progress.snapshot(), "warmup": warmup}

    # -- warm-up ----------------------------------------------------------------------------------
    def warm_up_steps(self) -> list:
        """(name, function, key) of the pieces the first clicks need, in the order a user meets them: the same
        calls with the page's default settings, so a click with those settings finds them compiled."""
        prompt = self.spec.novel_prompts[0] if self.spec.novel_prompts else "a scene"
        layout = self.settings.layout
        sample = commands.LayoutRequest(prompt, 0, "sample", layout.steps, layout.temperature, layout.guidance)
        most_probable = dataclasses.replace(sample, mode="map")
        image = commands.ImageRequest(prompt, 0, 1, self.settings.steps, self.settings.guidance, self.settings.solver)
        labels = np.zeros((self.size, self.size), np.uint8) if self.has_conditioner else None
        steps = []
        if self.has_layout_model:
            steps.append(("layout sampler", lambda: self._layouts(sample), self._layout_key(sample)))
        steps.append(("image sampler (1 image, default settings)", lambda: self._images(image, labels),
                      self._image_key(image, labels is not None)))
        if self.has_segmenter:
            steps.append(("evaluation segmenter", lambda: self.segmenter().predict(
                np.zeros((1, self.size, self.size, 3), np.uint8)), ("segmenter", 1)))
        if self.has_layout_model:
            steps.append(("most probable map", lambda: self._layouts(most_probable), self._layout_key(most_probable)))
        return steps

    def start_warm_up(self) -> threading.Thread:
        steps = self.warm_up_steps()
        with self._warmup_lock:
            for name, _, _ in steps:
                self._warmup[name] = "waiting"
        thread = threading.Thread(target=self._warm_up, args=(steps,), name="sdsup-demo-warm-up", daemon=True)
        thread.start()
        return thread

    def _warm_up(self, steps) -> None:
        for name, fn, key in steps:
            self._set_warmup(name, "compiling")
            started = time.monotonic()
            try:
                with self._models_lock:
                    fn()
                    self._seen_settings.add(key)
            except Exception as e:  # a warm-up failure must not stop the page; the click that needs it says why
                logging.exception("warm-up of %s failed", name)
                self._set_warmup(name, f"failed: {one_line(e)}")
                continue
            self._set_warmup(name, f"ready ({time.monotonic() - started:.1f} s)")

    def _set_warmup(self, name: str, state: str) -> None:
        with self._warmup_lock:
            self._warmup[name] = state

    # -- the models -------------------------------------------------------------------------------
    def segmenter(self):
        if self._segmenter is None:
            self._segmenter = suite.load_segmenter(self.workdir, self.settings.compiler_options)
        return self._segmenter

    @staticmethod
    def _layout_key(request: commands.LayoutRequest) -> tuple:
        """What selects a compiled layout sampler (the most probable map ignores steps and temperature)."""
        sampled = request.mode == "sample"
        return ("layout", request.mode) + ((request.steps, request.temperature) if sampled else ()) + \
            (request.guidance,)

    @staticmethod
    def _image_key(request: commands.ImageRequest, conditioned: bool) -> tuple:
        """What selects a compiled image sampler."""
        return ("images", request.num_samples, request.steps, request.guidance, request.solver, conditioned)

    def _layouts(self, request: commands.LayoutRequest) -> np.ndarray:
        sampled = request.mode == "sample"
        return self.session.layouts(request.prompt, 1, request.seed, request.mode,
                                    request.steps if sampled else None, request.temperature if sampled else None,
                                    request.guidance)[0]

    def _images(self, request: commands.ImageRequest, layout: Optional[np.ndarray]) -> np.ndarray:
        return self.session.images(request.prompt, layout, request.num_samples, request.seed, request.steps,
                                   request.guidance, request.solver)

    def _run(self, task: str, key: tuple, what: str, fn: Callable):
        """fn() under the models' lock, with the progress phase saying whether it compiles first."""
        self.progress.start(task, "waiting for the models (a warm-up compile or another request is running)")
        try:
            with self._models_lock:
                first = key not in self._seen_settings
                self.progress.phase(f"{what}: first use of these settings in this run, so it compiles first (or "
                                    "loads from the compilation cache)" if first else what)
                result = fn()
                self._seen_settings.add(key)
                return result
        finally:
            self.progress.finish()

    def _next_name(self, prefix: str) -> str:
        with self._state_lock:
            return f"{prefix}_{next(self._counter):03d}"

    def _folder(self, *parts: str) -> str:
        path = os.path.join(self.out, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def url(self, path: str) -> str:
        """The page's address of a file under the output folder."""
        return "/files/" + os.path.relpath(path, self.out).replace(os.sep, "/")

    # -- what the page asks -----------------------------------------------------------------------
    def layout(self, prompt, mode="sample", seed=0, steps=None, temperature=None, guidance=None) -> dict:
        """A map from the prompt: the layout model's sample or its most probable map."""
        if not self.has_layout_model:
            raise DemoError("this workdir has no text -> layout model (stage layout has not finished): paint or "
                            "upload a layout instead")
        if mode not in LAYOUT_MODES:
            raise DemoError(f"layout mode must be one of {LAYOUT_MODES}, got {mode!r}")
        defaults = self.settings.layout
        request = commands.LayoutRequest(
            check_prompt(prompt), _integer(seed, "layout seed", 0, MAX_SEED), mode,
            _integer(defaults.steps if steps is None else steps, "layout steps", 1, MAX_STEPS),
            _real(defaults.temperature if temperature is None else temperature, "layout temperature", 0.0, 100.0),
            _real(defaults.guidance if guidance is None else guidance, "layout guidance", 0.0, 100.0))
        key = self._layout_key(request)
        what = "drawing a layout" if mode == "sample" else "computing the most probable map"
        ids = self._run(what, key, what, lambda: self._layouts(request))
        token = secrets.token_hex(8)
        with self._state_lock:
            self._generated[token] = GeneratedLayout(request, ids)
            while len(self._generated) > 256:  # the page only needs the recent ones
                self._generated.popitem(last=False)
        command = commands.layout_command(self.workdir.path, os.path.join(self.out, "layouts", token), request)
        return {"ids": layouts.encode_ids(ids), "token": token, "command": command,
                "classes": layouts.classes_present(ids, self.spec), "request": dataclasses.asdict(request)}

    def upload_layout(self, filename: str, data: bytes, snap: bool = False) -> dict:
        upload = layouts.read_layout_upload(filename, data, self.spec, self.size, snap)
        return {"ids": layouts.encode_ids(upload.array), "notes": upload.notes,
                "classes": layouts.classes_present(upload.array, self.spec)}

    def segment_photo(self, filename: str, data: bytes) -> dict:
        """A photo -> the evaluation segmenter's map of it, as a layout (ControlNet's path from a picture)."""
        if not self.has_segmenter:
            raise DemoError("this workdir has no evaluation segmenter (stage evalseg has not finished): a photo "
                            "cannot be segmented")
        photo = layouts.read_photo(filename, data, self.geometry)
        ids = self._run("segmenting the photo", ("segmenter", 1), "segmenting the photo",
                        lambda: self.segmenter().predict(photo.array[None])[0].astype(np.uint8))
        folder = self._folder("photos")
        path = os.path.join(folder, self._next_name("photo") + ".png")
        viz.save_png(photo.array, path)
        return {"ids": layouts.encode_ids(ids), "notes": photo.notes, "photo": self.url(path),
                "classes": layouts.classes_present(ids, self.spec)}

    def export_layout(self, ids_text: str) -> dict:
        """The page's current map as files (ids .npy, palette .png) for download."""
        ids = layouts.decode_ids(ids_text, self.size, self.spec)
        folder = self._folder("layouts", self._next_name("edit"))
        npy, png = os.path.join(folder, "layout.npy"), os.path.join(folder, LAYOUT_PALETTE_FILE)
        np.save(npy, ids)
        viz.save_png(layouts.palette_image(ids, self.spec), png)
        return {"npy": self.url(npy), "png": self.url(png)}

    def generate(self, prompt, layout: Optional[str] = None, seed=0, num_samples=1, steps=None, guidance=None,
                 solver=None, layout_token: Optional[str] = None) -> dict:
        """Images from the prompt and the page's layout, the segmenter's reading of each, files and commands."""
        request = commands.ImageRequest(
            check_prompt(prompt), _integer(seed, "seed", 0, MAX_SEED),
            _integer(num_samples, "number of images", 1, MAX_IMAGES),
            _integer(self.settings.steps if steps is None else steps, "steps", 1, MAX_STEPS),
            _real(self.settings.guidance if guidance is None else guidance, "guidance", 0.0, 100.0),
            self.settings.solver if solver is None else solver)
        if request.solver not in SOLVERS:
            raise DemoError(f"solver must be one of {SOLVERS}, got {request.solver!r}")
        ids = layouts.decode_ids(layout, self.size, self.spec) if layout is not None else None
        if self.has_conditioner:
            if ids is None:
                raise DemoError("no layout: generate one from the prompt, paint or upload one first")
            layouts.check_labelled(ids, self.spec)
        elif ids is not None and (ids == self.spec.ignore_id).all():
            ids = None  # text only, and nothing painted to compare the reading with
        conditioning = ids if self.has_conditioner else None
        started = time.monotonic()
        n = request.num_samples
        key = self._image_key(request, conditioning is not None)
        task = f"generating {n} image{'s' if n > 1 else ''}"
        images = self._run(task, key, f"sampling {n} image{'s' if n > 1 else ''} ({request.steps} steps)",
                           lambda: self._images(request, conditioning))
        readings = None
        if self.has_segmenter:
            readings = self._run("reading the images", ("segmenter", n), "the evaluation segmenter reads the images",
                                 lambda: self.segmenter().predict(images))
        seconds = time.monotonic() - started
        return self._save_result(request, images, ids, conditioning, readings, layout_token, seconds)

    def _save_result(self, request, images, ids, conditioning, readings, layout_token, seconds) -> dict:
        folder = self._folder(self._next_name("run"))
        # sdsup.sample's files: image_<i>.png, and with a layout layout.npy + layout.png (with legend).
        image_paths = self.session.save(folder, images, conditioning, request.prompt)
        layout_file = os.path.join(folder, "layout.npy") if conditioning is not None else None
        files = {"images": [self.url(p) for p in image_paths]}
        if ids is not None:
            if conditioning is None:  # not conditioned on, but kept: the reading is compared with it
                np.save(os.path.join(folder, "layout.npy"), ids)
            viz.save_png(layouts.palette_image(ids, self.spec), os.path.join(folder, LAYOUT_PALETTE_FILE))
            files.update(npy=self.url(os.path.join(folder, "layout.npy")),
                         png=self.url(os.path.join(folder, LAYOUT_PALETTE_FILE)))
            if conditioning is not None:
                files["legend"] = self.url(os.path.join(folder, "layout.png"))
        results = []
        for i, path in enumerate(image_paths):
            entry = {"image": self.url(path), "reading": None, "agreement": None}
            if readings is not None:
                reading = np.asarray(readings[i], np.uint8)
                reading_path = os.path.join(folder, READING_FILE.format(i))
                viz.save_png(viz.colorize(reading, self.spec.palette, self.spec.ignore_id), reading_path)
                entry["reading"] = self.url(reading_path)
                if ids is not None and not (ids == self.spec.ignore_id).all():
                    entry["agreement"] = layouts.agreement(reading, ids, self.spec)
            results.append(entry)
        command = commands.images_command(self.workdir.path, os.path.join(folder, "reproduced"), request, layout_file)
        with self._state_lock:
            generated = self._generated.get(layout_token) if layout_token else None
        unedited = generated is not None and ids is not None and np.array_equal(generated.ids, ids)
        layout_command = None
        if unedited:
            layout_command = commands.layout_command(self.workdir.path, os.path.join(folder, "reproduced_layout"),
                                                     generated.request)
        result = {"run": os.path.basename(folder), "folder": folder, "results": results, "files": files,
                  "command": command, "layout_command": layout_command, "seconds": round(seconds, 3),
                  "request": dataclasses.asdict(request), "conditioned": conditioning is not None}
        files["all"] = f"/zip/{os.path.basename(folder)}"
        with open(os.path.join(folder, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=2)
        return result
