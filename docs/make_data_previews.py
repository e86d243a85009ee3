"""Draws the dataset previews of docs/data.md: docs/data_previews/{ade20k,cityscapes,coco_stuff,folder}.png.

There is no real data in this repository, so this writes a small fixture of each dataset in its own
on-disk layout (extracted folders; the layouts of tests/test_real_datasets.py): a few painted scenes
(sky, ground, buildings, cars, people ...) drawn as label maps with the dataset's raw label values, an
image painted from each label map (a natural colour per class, shading, texture, mild noise) and
captions that describe the scene. It then runs the `data` stage on each fixture, as a user would:

  python -m sdsup.train --config=configs/scenes.py:smoke --workdir=WD --only=data \
      --config.data.name=NAME --config.data.path=DIR [--config.data.captions=DIR/captions.json] ...

and copies WD/data/preview.png to docs/data_previews/NAME.png.

  python docs/make_data_previews.py                    # all four
  python docs/make_data_previews.py --only=cityscapes  # some (comma-separated)
  python docs/make_data_previews.py --keep=/tmp/fx     # keep the fixtures and workdirs there
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "data_previews")
sys.path.insert(0, ROOT)

from sdsup.data.real import classes  # noqa: E402  (plain tables: no TensorFlow)

IMAGE_SIZE = 128
PREVIEW_EXAMPLES = 4
MAX_BYTES = 150_000

# ----------------------------------------------------------------------------
# Raw label values, by class name, of each dataset's files.
# ----------------------------------------------------------------------------
ADE_RAW = {name: i + 1 for i, name in enumerate(classes.ADE20K_CLASSES)}  # 0 = "other"
CITY_RAW = {classes.CITYSCAPES_CLASSES[t]: label_id for label_id, t in classes.CITYSCAPES_TRAIN_IDS.items()}
CITY_RAW.update({"unlabeled": 0, "ego vehicle": 1})  # labelIds that Cityscapes ignores
_COCO_USED = [v for v in range(182) if v not in classes.COCO_STUFF_UNUSED]
COCO_RAW = {name: _COCO_USED[i] for i, name in enumerate(classes.COCO_STUFF_CLASSES)}
COCO_RAW["unlabeled"] = 255
FOLDER_CLASSES = ("sky", "tree", "lawn", "path", "house", "flowerbed", "pond")
FOLDER_RAW = {name: i for i, name in enumerate(FOLDER_CLASSES)}

# The values the dataset documentation quotes; a wrong table would draw wrong fixtures.
assert (ADE_RAW["wall"], ADE_RAW["sky"], ADE_RAW["road"], ADE_RAW["person"], ADE_RAW["car"]) == (1, 3, 7, 13, 21)
assert (CITY_RAW["road"], CITY_RAW["building"], CITY_RAW["vegetation"], CITY_RAW["sky"], CITY_RAW["person"],
        CITY_RAW["car"]) == (7, 11, 21, 23, 24, 26)
assert (COCO_RAW["person"], COCO_RAW["stop sign"], COCO_RAW["banner"], COCO_RAW["wood"]) == (0, 12, 91, 181)

# ----------------------------------------------------------------------------
# How each class looks in a painted image: (colour, vertical gradient, texture strength).
# ----------------------------------------------------------------------------
LOOKS = {
    "sky": ((120, 170, 225), 0.35, 0.01),
    "building": ((168, 130, 110), -0.1, 0.05), "house": ((200, 170, 140), -0.1, 0.05),
    "skyscraper": ((150, 160, 175), -0.1, 0.04), "wall": ((214, 204, 184), -0.15, 0.02),
    "ceiling": ((236, 234, 228), 0.1, 0.01), "floor": ((150, 108, 72), 0.2, 0.05),
    "road": ((92, 92, 98), 0.25, 0.04), "sidewalk": ((172, 166, 158), 0.2, 0.04), "path": ((190, 172, 135), 0.2, 0.06),
    "grass": ((88, 150, 62), 0.25, 0.12), "field": ((170, 170, 80), 0.25, 0.1), "earth": ((140, 110, 80), 0.2, 0.1),
    "tree": ((52, 112, 48), 0.2, 0.16), "plant": ((60, 130, 55), 0.1, 0.15), "flower": ((220, 90, 140), 0.0, 0.2),
    "mountain": ((112, 116, 130), 0.25, 0.06), "water": ((58, 104, 150), 0.25, 0.05),
    "sea": ((48, 100, 160), 0.25, 0.05), "sand": ((222, 200, 150), 0.15, 0.06), "dirt": ((150, 118, 82), 0.2, 0.1),
    "trunk": ((96, 70, 46), 0.0, 0.08), "fence": ((140, 110, 80), 0.0, 0.04),
    "person": ((60, 80, 140), 0.0, 0.02), "skin": ((222, 178, 146), 0.0, 0.01), "car": ((170, 30, 35), 0.0, 0.02),
    "glass": ((70, 90, 110), 0.0, 0.02), "tyre": ((28, 28, 30), 0.0, 0.01),
    "bed": ((236, 228, 212), 0.0, 0.02), "pillow": ((245, 245, 240), 0.0, 0.01), "wood": ((132, 88, 52), 0.05, 0.05),
    "window": ((170, 205, 230), 0.2, 0.01), "painting": ((190, 120, 60), 0.0, 0.12),
    "lamp": ((250, 230, 170), 0.0, 0.01), "rug": ((150, 50, 50), 0.0, 0.06), "cabinet": ((160, 110, 68), 0.0, 0.04),
    "refrigerator": ((228, 230, 232), 0.1, 0.01), "sofa": ((80, 100, 120), 0.0, 0.03),
    "boat": ((230, 232, 235), 0.0, 0.01), "metal": ((120, 124, 130), 0.0, 0.02),
    "bus": ((230, 190, 40), 0.0, 0.02), "truck": ((235, 235, 235), 0.0, 0.02), "bicycle": ((30, 30, 30), 0.0, 0.01),
    "sign": ((30, 90, 190), 0.0, 0.01), "light red": ((220, 40, 30), 0.0, 0.01),
    "terrain": ((120, 150, 80), 0.2, 0.12),
    "ego": ((40, 44, 52), 0.0, 0.01), "table": ((200, 190, 170), 0.0, 0.03), "bowl": ((240, 240, 236), 0.0, 0.01),
    "broccoli": ((70, 130, 50), 0.0, 0.25), "orange": ((240, 140, 30), 0.0, 0.06),
    "giraffe": ((205, 160, 90), 0.0, 0.2),
    "zebra": ((230, 230, 225), 0.0, 0.04), "vase": ((60, 100, 170), 0.0, 0.02), "umbrella": ((220, 60, 90), 0.0, 0.02),
    "tv": ((25, 25, 30), 0.0, 0.01), "bear": ((95, 65, 40), 0.0, 0.12), "bush": ((58, 100, 45), 0.1, 0.18),
    "stone": ((150, 148, 140), 0.0, 0.1),
}

# ----------------------------------------------------------------------------
# Drawing: shapes in fractions of the width and height, painted in order.
# ----------------------------------------------------------------------------


class Canvas:
    """A label map of raw values and the image painted from it."""

    def __init__(self, width: int, height: int, raw: dict, seed: int):
        self.w, self.h, self.raw, self.rng = width, height, raw, np.random.default_rng(seed)
        self.label = np.zeros((height, width), np.uint8)
        self.base = np.zeros((height, width, 3), np.float32)
        self.grad = np.zeros((height, width), np.float32)
        self.tex = np.zeros((height, width), np.float32)
        self.painted = np.zeros((height, width), bool)

    def _mask(self, kind: str, *args) -> np.ndarray:
        img = Image.new("L", (self.w, self.h), 0)
        draw = ImageDraw.Draw(img)
        sx, sy = self.w - 1, self.h - 1
        if kind == "rect":
            x0, y0, x1, y1 = args
            draw.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], fill=255)
        elif kind == "ellipse":
            x0, y0, x1, y1 = args
            draw.ellipse([x0 * sx, y0 * sy, x1 * sx, y1 * sy], fill=255)
        elif kind == "poly":
            draw.polygon([(x * sx, y * sy) for x, y in args[0]], fill=255)
        elif kind in ("below", "above"):  # everything below / above a wavy line y + amp*sin(...)
            y, amp, waves, phase = (list(args) + [0.0, 1.0, 0.0][len(args) - 1:])[:4]
            xs = np.linspace(0, 1, 65)
            line = [(x, y + amp * math.sin(2 * math.pi * (waves * x + phase))) for x in xs]
            edge = [(1.0, 1.2), (0.0, 1.2)] if kind == "below" else [(1.0, -0.2), (0.0, -0.2)]
            draw.polygon([(x * sx, v * sy) for x, v in line + edge], fill=255)
        else:
            raise ValueError(kind)
        return np.asarray(img) > 127

    def fill(self, name: str, kind: str, *args, look: str = None, colour=None, within: str = None) -> None:
        """Label the shape `name` (a class of the dataset); paint it as `look` (default: the class's own look);
        `within`: only where the class `within` is already."""
        m = self._mask(kind, *args)
        if within is not None:
            m &= self.label == self.raw[within]
        self.painted |= m
        self.label[m] = self.raw[name]
        key = look or _look_name(name)
        c, g, t = LOOKS[key]
        if colour is not None:
            c = colour
        self.base[m] = c
        self.grad[m] = g
        self.tex[m] = t

    # Composite objects: one class, several painted parts.
    def person(self, name: str, x: float, feet: float, height: float, shirt=(60, 80, 140), trousers=(45, 45, 60)):
        w = height * self.h / self.w * 0.28
        self.fill(name, "rect", x - w * 0.35, feet - height * 0.48, x + w * 0.35, feet, look="person", colour=trousers)
        self.fill(name, "ellipse", x - w * 0.5, feet - height * 0.82, x + w * 0.5, feet - height * 0.4,
                  look="person", colour=shirt)
        self.fill(name, "ellipse", x - w * 0.28, feet - height, x + w * 0.28, feet - height * 0.78, look="skin")

    def car(self, name: str, x0: float, y0: float, x1: float, y1: float, colour=(170, 30, 35), side: bool = True):
        w, h = x1 - x0, y1 - y0
        if side:  # seen from the side: body, cabin, windows, wheels
            self.fill(name, "poly", [(x0 + 0.22 * w, y0 + 0.45 * h), (x0 + 0.32 * w, y0), (x0 + 0.7 * w, y0),
                                     (x0 + 0.82 * w, y0 + 0.45 * h)], look="car", colour=colour)
            self.fill(name, "poly", [(x0 + 0.28 * w, y0 + 0.42 * h), (x0 + 0.35 * w, y0 + 0.1 * h),
                                     (x0 + 0.67 * w, y0 + 0.1 * h), (x0 + 0.76 * w, y0 + 0.42 * h)], look="glass")
            self.fill(name, "rect", x0, y0 + 0.4 * h, x1, y0 + 0.82 * h, look="car", colour=colour)
            for cx in (x0 + 0.2 * w, x0 + 0.8 * w):
                self.fill(name, "ellipse", cx - 0.09 * w, y1 - 0.36 * h, cx + 0.09 * w, y1, look="tyre")
        else:  # seen from behind
            self.fill(name, "rect", x0, y0 + 0.35 * h, x1, y1 - 0.12 * h, look="car", colour=colour)
            self.fill(name, "poly", [(x0 + 0.1 * w, y0 + 0.38 * h), (x0 + 0.2 * w, y0), (x1 - 0.2 * w, y0),
                                     (x1 - 0.1 * w, y0 + 0.38 * h)], look="car", colour=colour)
            self.fill(name, "poly", [(x0 + 0.16 * w, y0 + 0.34 * h), (x0 + 0.24 * w, y0 + 0.07 * h),
                                     (x1 - 0.24 * w, y0 + 0.07 * h), (x1 - 0.16 * w, y0 + 0.34 * h)], look="glass")
            self.fill(name, "rect", x0 + 0.05 * w, y1 - 0.14 * h, x0 + 0.22 * w, y1, look="tyre")
            self.fill(name, "rect", x1 - 0.22 * w, y1 - 0.14 * h, x1 - 0.05 * w, y1, look="tyre")
            self.fill(name, "rect", x0 + 0.04 * w, y0 + 0.5 * h, x0 + 0.16 * w, y0 + 0.6 * h, look="light red")
            self.fill(name, "rect", x1 - 0.16 * w, y0 + 0.5 * h, x1 - 0.04 * w, y0 + 0.6 * h, look="light red")

    def tree(self, name: str, x: float, top: float, bottom: float, crown: float, trunk_name: str = None):
        rx = crown * self.h / self.w
        self.fill(trunk_name or name, "rect", x - rx * 0.12, top + crown, x + rx * 0.12, bottom, look="trunk")
        self.fill(name, "ellipse", x - rx, top, x + rx, top + crown * 1.6, look="tree")

    def windows(self, name: str, x0, y0, x1, y1, cols: int, rows: int, look="window"):
        dx, dy = (x1 - x0) / cols, (y1 - y0) / rows
        for i in range(cols):
            for j in range(rows):
                self.fill(name, "rect", x0 + (i + 0.25) * dx, y0 + (j + 0.2) * dy, x0 + (i + 0.75) * dx,
                          y0 + (j + 0.75) * dy, look=look)

    def image(self) -> np.ndarray:
        """The painted picture: colours with a vertical gradient per class, smooth light, texture, noise."""
        if not self.painted.all():
            raise ValueError(f"{(~self.painted).sum()} pixels are not painted")
        h, w = self.h, self.w
        y = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
        img = self.base * (1.0 + self.grad * y)[..., None]
        img *= (1.0 + 0.1 * _smooth(self.rng, h, w, 4))[..., None]  # uneven light
        grain = 0.6 * _smooth(self.rng, h, w, max(w, h) // 6) + 0.4 * self.rng.standard_normal((h, w))
        img *= (1.0 + self.tex * grain)[..., None]
        img += self.rng.normal(0, 2.5, img.shape)
        out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        return np.asarray(out.filter(ImageFilter.GaussianBlur(0.7)))


def _look_name(name: str) -> str:
    """The look of a class name of any of the datasets."""
    name = name.split("-")[0]  # COCO-Stuff: sky-other, wall-brick ...
    aliases = {"vegetation": "tree", "windowpane": "window", "coffee table": "table", "dining table": "table",
               "potted plant": "plant", "couch": "sofa", "lawn": "grass", "flowerbed": "flower", "pond": "water",
               "playingfield": "grass", "traffic sign": "sign", "traffic light": "metal", "pole": "metal",
               "rider": "person", "unlabeled": "ego", "ego vehicle": "ego", "motorcycle": "tyre"}
    return aliases.get(name, name)


def _smooth(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random grid of about `cells` cells across, upsampled bicubically."""
    gh, gw = max(2, round(cells * h / max(h, w))) + 1, max(2, round(cells * w / max(h, w))) + 1
    grid = Image.fromarray(rng.uniform(0, 255, (gh, gw)).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------
# The scenes. Each draws on a Canvas and returns its captions (the first is the one the preview shows).
# ----------------------------------------------------------------------------
def ade_street(c: Canvas):
    c.fill("sky", "rect", 0, 0, 1, 0.6)
    c.fill("building", "rect", 0, 0.08, 0.3, 0.66)
    c.windows("building", 0.02, 0.12, 0.28, 0.58, 4, 5)
    c.fill("building", "rect", 0.3, 0.32, 0.62, 0.62, colour=(200, 185, 160))
    c.fill("skyscraper", "rect", 0.62, 0.02, 1, 0.66)
    c.windows("skyscraper", 0.64, 0.05, 0.98, 0.6, 5, 9, look="glass")
    c.fill("sidewalk", "rect", 0, 0.62, 1, 0.74)
    c.fill("road", "poly", [(0, 0.74), (1, 0.74), (1, 1), (0, 1)])
    c.tree("tree", 0.5, 0.3, 0.66, 0.2)
    c.car("car", 0.06, 0.66, 0.4, 0.92, colour=(30, 70, 160))
    c.car("car", 0.56, 0.68, 0.8, 0.86, colour=(190, 190, 195))
    c.person("person", 0.9, 0.72, 0.3, shirt=(200, 60, 50))
    return ["a city street with parked cars, a tall glass skyscraper and a person walking on the sidewalk"]


def ade_park(c: Canvas):
    c.fill("sky", "rect", 0, 0, 1, 0.6)
    c.fill("mountain", "poly", [(0, 0.55), (0.2, 0.3), (0.38, 0.45), (0.6, 0.22), (0.85, 0.42), (1, 0.35), (1, 0.6),
                                (0, 0.6)])
    c.fill("grass", "below", 0.55, 0.015, 2)
    c.fill("path", "poly", [(0.42, 0.58), (0.5, 0.58), (0.8, 1), (0.3, 1)])
    for x, top, s in ((0.1, 0.25, 0.22), (0.28, 0.35, 0.15), (0.83, 0.28, 0.2)):
        c.tree("tree", x, top, top + s * 2.2, s)
    c.fill("bench", "rect", 0.12, 0.74, 0.3, 0.8, look="wood")
    c.fill("bench", "rect", 0.12, 0.66, 0.3, 0.7, look="wood")
    c.fill("bench", "rect", 0.13, 0.8, 0.15, 0.86, look="metal")
    c.fill("bench", "rect", 0.27, 0.8, 0.29, 0.86, look="metal")
    c.person("person", 0.58, 0.84, 0.34, shirt=(240, 200, 60))
    return ["a green park with trees and a wooden bench, a person walking on a path towards the mountains"]


def ade_bedroom(c: Canvas):
    c.fill("wall", "rect", 0, 0, 1, 1)
    c.fill("ceiling", "poly", [(0, 0), (1, 0), (0.85, 0.12), (0.15, 0.12)])
    c.fill("floor", "poly", [(0, 1), (0.12, 0.68), (0.88, 0.68), (1, 1)])
    c.fill("windowpane", "rect", 0.62, 0.2, 0.86, 0.52)
    c.fill("curtain", "rect", 0.56, 0.16, 0.63, 0.62, look="rug", colour=(170, 140, 90))
    c.fill("painting", "rect", 0.2, 0.22, 0.42, 0.4)
    c.fill("rug", "poly", [(0.25, 0.86), (0.75, 0.86), (0.82, 0.98), (0.18, 0.98)])
    c.fill("bed", "rect", 0.14, 0.46, 0.18, 0.8, look="wood")
    c.fill("bed", "rect", 0.16, 0.56, 0.52, 0.82)
    c.fill("pillow", "ellipse", 0.18, 0.5, 0.32, 0.6)
    c.fill("lamp", "rect", 0.8, 0.56, 0.82, 0.78, look="metal")
    c.fill("lamp", "poly", [(0.77, 0.56), (0.85, 0.56), (0.83, 0.48), (0.79, 0.48)])
    return ["a bright bedroom with a large bed, a window with curtains, a lamp and a painting on the wall"]


def ade_lake(c: Canvas):
    c.fill("sky", "rect", 0, 0, 1, 0.5)
    c.fill("mountain", "poly", [(0, 0.5), (0, 0.3), (0.25, 0.12), (0.45, 0.34), (0.7, 0.18), (1, 0.4), (1, 0.5)])
    c.fill("tree", "below", 0.42, 0.02, 5, look="tree")
    c.fill("water", "below", 0.54)
    c.fill("boat", "poly", [(0.4, 0.7), (0.62, 0.7), (0.58, 0.76), (0.44, 0.76)])
    c.fill("boat", "rect", 0.505, 0.56, 0.512, 0.7, look="wood")
    c.fill("boat", "poly", [(0.515, 0.57), (0.6, 0.69), (0.515, 0.69)], look="pillow")
    return ["a calm mountain lake surrounded by forest with a small sailing boat on the water"]


def ade_kitchen(c: Canvas):
    c.fill("wall", "rect", 0, 0, 1, 1, colour=(200, 214, 214))
    c.fill("floor", "poly", [(0, 1), (0, 0.74), (1, 0.74), (1, 1)], look="stone")
    c.fill("cabinet", "rect", 0.02, 0.08, 0.5, 0.3)
    c.fill("cabinet", "rect", 0.02, 0.46, 0.5, 0.76)
    c.fill("countertop", "rect", 0.01, 0.43, 0.51, 0.47, look="stone")
    c.fill("windowpane", "rect", 0.56, 0.12, 0.72, 0.4)
    c.fill("refrigerator", "rect", 0.78, 0.12, 0.98, 0.78)
    c.fill("table", "rect", 0.5, 0.58, 0.76, 0.62, look="wood")
    c.fill("table", "rect", 0.52, 0.62, 0.54, 0.86, look="wood")
    c.fill("table", "rect", 0.72, 0.62, 0.74, 0.86, look="wood")
    c.fill("chair", "rect", 0.44, 0.5, 0.46, 0.9, look="wood", colour=(90, 60, 40))
    c.fill("chair", "rect", 0.44, 0.68, 0.52, 0.71, look="wood", colour=(90, 60, 40))
    return ["a kitchen with wooden cabinets, a white refrigerator and a small table with a chair by the window"]


def ade_house(c: Canvas):
    c.fill("sky", "rect", 0, 0, 1, 0.55)
    c.fill("field", "below", 0.5, 0.01, 1.5)
    c.fill("house", "rect", 0.3, 0.3, 0.66, 0.62)
    c.fill("house", "poly", [(0.26, 0.32), (0.48, 0.12), (0.7, 0.32)], look="house", colour=(140, 50, 40))
    c.windows("house", 0.32, 0.36, 0.64, 0.5, 3, 1)
    c.fill("door", "rect", 0.46, 0.48, 0.52, 0.62, look="wood")
    c.tree("tree", 0.82, 0.18, 0.6, 0.18)
    c.fill("fence", "rect", 0, 0.66, 1, 0.68)
    for i in range(20):
        c.fill("fence", "rect", i / 20 + 0.01, 0.6, i / 20 + 0.025, 0.76)
    return ["a farm house with a red roof in an open field behind a wooden fence, a tree beside it"]


def ade_living(c: Canvas):
    c.fill("wall", "rect", 0, 0, 1, 0.72, colour=(226, 210, 180))
    c.fill("floor", "below", 0.72)
    c.fill("painting", "rect", 0.35, 0.15, 0.65, 0.35)
    c.fill("sofa", "rect", 0.2, 0.42, 0.8, 0.58)
    c.fill("sofa", "rect", 0.16, 0.52, 0.84, 0.76)
    c.fill("coffee table", "rect", 0.32, 0.8, 0.68, 0.86)
    c.fill("plant", "ellipse", 0.86, 0.3, 0.98, 0.62)
    c.fill("pot", "rect", 0.88, 0.6, 0.96, 0.76, look="stone")
    return ["a living room with a blue sofa, a low coffee table, a plant and a painting on the wall"]


def city_street(c: Canvas, variant: int):
    """A Cityscapes frame from a car: road ahead, sidewalks, buildings or trees on both sides, the car's bonnet."""
    c.fill("sky", "rect", 0, 0, 1, 0.56)
    c.fill("road", "below", 0.52)
    if variant in (0, 2, 4):
        c.fill("building", "poly", [(0, 0), (0.42, 0.3), (0.42, 0.52), (0, 0.62)])
        c.fill("building", "poly", [(1, 0.02), (0.58, 0.3), (0.58, 0.52), (1, 0.62)], colour=(190, 180, 165))
        c.windows("building", 0.04, 0.12, 0.36, 0.5, 6, 4, look="glass")
        c.windows("building", 0.64, 0.14, 0.96, 0.5, 6, 4, look="glass")
    else:
        c.fill("vegetation", "ellipse", -0.1, -0.1, 0.48, 0.62)
        c.fill("vegetation", "ellipse", 0.52, -0.12, 1.1, 0.6)
        c.fill("terrain", "poly", [(0, 0.6), (0.4, 0.5), (0.44, 0.52), (0.12, 0.7), (0, 0.72)])
        c.fill("terrain", "poly", [(1, 0.6), (0.6, 0.5), (0.56, 0.52), (0.88, 0.7), (1, 0.72)])
    c.fill("sidewalk", "poly", [(0, 0.62), (0.44, 0.52), (0.46, 0.52), (0.2, 0.8), (0, 0.8)])
    c.fill("sidewalk", "poly", [(1, 0.62), (0.56, 0.52), (0.54, 0.52), (0.8, 0.8), (1, 0.8)])
    c.fill("road", "poly", [(0.46, 0.52), (0.54, 0.52), (0.8, 0.8), (1, 0.8), (1, 1), (0, 1), (0, 0.8), (0.2, 0.8)])
    c.fill("pole", "rect", 0.355, 0.2, 0.362, 0.6)
    c.fill("traffic sign", "ellipse", 0.343, 0.18, 0.374, 0.24)


def city_scene(c: Canvas, variant: int):
    city_street(c, variant)
    if variant == 0:
        c.car("car", 0.58, 0.5, 0.66, 0.64, colour=(200, 200, 205), side=False)
        c.car("car", 0.62, 0.54, 0.74, 0.72, colour=(30, 40, 90), side=False)
        c.person("person", 0.39, 0.62, 0.2)
        c.person("person", 0.415, 0.6, 0.18, shirt=(170, 40, 40))
        caps = ["a city street lined with buildings, two cars parked on the right and two pedestrians on the "
                "left sidewalk"]
    elif variant == 1:
        c.person("rider", 0.56, 0.62, 0.2, shirt=(230, 120, 20))
        c.fill("bicycle", "ellipse", 0.535, 0.6, 0.555, 0.66)
        c.fill("bicycle", "ellipse", 0.565, 0.6, 0.585, 0.66)
        c.car("car", 0.43, 0.5, 0.5, 0.6, colour=(150, 20, 25), side=False)
        caps = ["a tree-lined road with a cyclist riding ahead and a red car in front"]
    elif variant == 2:
        c.fill("bus", "rect", 0.44, 0.3, 0.56, 0.58)
        c.fill("bus", "rect", 0.455, 0.34, 0.545, 0.44, look="glass")
        c.fill("traffic light", "rect", 0.62, 0.18, 0.63, 0.56)
        c.fill("traffic light", "rect", 0.615, 0.16, 0.635, 0.24, look="tyre")
        c.car("car", 0.34, 0.52, 0.44, 0.66, colour=(40, 40, 45), side=False)
        caps = ["a yellow bus waiting at a traffic light at an intersection, a dark car beside it"]
    elif variant == 3:
        for i, x in enumerate((0.3, 0.36, 0.62, 0.68)):
            c.car("car", x, 0.55 - i % 2 * 0.01, x + 0.06, 0.63, colour=((90, 110, 140), (220, 220, 220))[i % 2],
                  side=False)
        c.fill("fence", "rect", 0.0, 0.55, 0.28, 0.6)
        caps = ["a quiet residential street with cars parked on both sides under large trees"]
    elif variant == 4:
        c.fill("truck", "rect", 0.46, 0.26, 0.56, 0.58)
        c.fill("truck", "rect", 0.45, 0.5, 0.57, 0.58, look="tyre")
        c.car("car", 0.58, 0.5, 0.66, 0.62, colour=(130, 130, 135), side=False)
        caps = ["a wide road between office buildings with a white truck driving ahead"]
    else:
        c.person("person", 0.52, 0.7, 0.26, shirt=(40, 120, 60))
        c.person("person", 0.47, 0.66, 0.22, shirt=(200, 180, 40))
        c.car("car", 0.6, 0.52, 0.7, 0.66, colour=(60, 60, 150), side=False)
        caps = ["two pedestrians crossing a road lined with trees, a blue car waiting"]
    c.fill("ego vehicle", "below", 0.9, 0.03, 0.5, 0.25)
    return caps


def coco_bowls(c: Canvas):
    c.fill("wall-other", "rect", 0, 0, 1, 0.3)
    c.fill("dining table", "rect", 0, 0.3, 1, 1)
    c.fill("bowl", "ellipse", 0.05, 0.38, 0.5, 0.9)
    c.fill("broccoli", "ellipse", 0.12, 0.45, 0.43, 0.78)
    c.fill("bowl", "ellipse", 0.52, 0.36, 0.95, 0.84)
    for x, y in ((0.6, 0.45), (0.72, 0.42), (0.65, 0.58), (0.78, 0.55)):
        c.fill("orange", "ellipse", x, y, x + 0.11, y + 0.15)
    return ["two white bowls on a table, one filled with broccoli and one with oranges",
            "a bowl of broccoli next to a bowl of oranges", "fresh vegetables and fruit served in bowls"]


def coco_giraffe(c: Canvas):
    c.fill("sky-other", "rect", 0, 0, 1, 0.55)
    c.fill("tree", "ellipse", 0.55, 0.05, 1.1, 0.7)
    c.fill("grass", "below", 0.54, 0.01, 1.5)
    c.fill("giraffe", "poly", [(0.25, 0.45), (0.5, 0.45), (0.52, 0.55), (0.23, 0.55)])
    c.fill("giraffe", "poly", [(0.44, 0.47), (0.52, 0.12), (0.56, 0.12), (0.5, 0.5)])
    c.fill("giraffe", "ellipse", 0.51, 0.08, 0.6, 0.15)
    for x in (0.25, 0.3, 0.44, 0.48):
        c.fill("giraffe", "rect", x, 0.54, x + 0.02, 0.8)
    return ["a giraffe standing on the grass next to a large tree", "a tall giraffe in a grassy field",
            "a giraffe walks past a tree on a sunny day"]


def coco_vase(c: Canvas):
    c.fill("wall-other", "rect", 0, 0, 1, 0.66, colour=(230, 225, 210))
    c.fill("window-other", "rect", 0.62, 0.08, 0.92, 0.5)
    c.fill("table", "below", 0.66)
    c.fill("vase", "poly", [(0.4, 0.4), (0.52, 0.4), (0.56, 0.62), (0.5, 0.82), (0.42, 0.82), (0.36, 0.62)])
    c.fill("flower", "ellipse", 0.3, 0.1, 0.62, 0.42)
    for x, y in ((0.34, 0.15), (0.45, 0.12), (0.52, 0.22), (0.38, 0.28)):
        c.fill("flower", "ellipse", x, y, x + 0.07, y + 0.09, look="orange", colour=(250, 230, 80))
    return ["a blue vase holding a bunch of flowers on a table by a window",
            "flowers in a vase sitting on a wooden table", "a bouquet in a vase in front of a window"]


def coco_zebra(c: Canvas):
    c.fill("sky-other", "rect", 0, 0, 1, 0.35)
    c.fill("bush", "below", 0.3, 0.03, 3)
    c.fill("grass", "below", 0.55, 0.01, 2)
    c.fill("dirt", "ellipse", 0.1, 0.8, 0.7, 1.1)
    c.fill("zebra", "ellipse", 0.28, 0.45, 0.66, 0.65)
    c.fill("zebra", "poly", [(0.6, 0.5), (0.7, 0.32), (0.76, 0.36), (0.66, 0.55)])
    c.fill("zebra", "ellipse", 0.7, 0.3, 0.8, 0.4)
    for x in (0.31, 0.36, 0.56, 0.61):
        c.fill("zebra", "rect", x, 0.6, x + 0.025, 0.86)
    for k in range(22):  # stripes
        x = 0.27 + 0.025 * k
        c.fill("zebra", "poly", [(x, 0.28), (x + 0.01, 0.28), (x + 0.03, 0.9), (x + 0.02, 0.9)], look="tyre",
               within="zebra")
    return ["a zebra grazing on a grassy field in front of some bushes", "a single zebra standing in the grass",
            "a zebra in the wild near a patch of dirt"]


def coco_umbrella(c: Canvas):
    c.fill("sky-other", "rect", 0, 0, 1, 0.5)
    c.fill("sea", "rect", 0, 0.45, 1, 0.62)
    c.fill("sand", "below", 0.6, 0.01, 1)
    c.person("person", 0.45, 0.95, 0.6, shirt=(240, 240, 240), trousers=(50, 80, 150))
    c.fill("umbrella", "rect", 0.495, 0.2, 0.505, 0.55, look="metal")
    c.fill("umbrella", "poly", [(0.3, 0.25), (0.5, 0.08), (0.7, 0.25)])
    c.fill("surfboard", "ellipse", 0.72, 0.5, 0.8, 0.95, look="pillow", colour=(250, 220, 120))
    return ["a woman holding an umbrella on a sandy beach next to a surfboard",
            "a person with a pink umbrella at the beach", "a woman stands on the sand by the sea with an umbrella"]


def coco_living(c: Canvas):
    c.fill("wall-other", "rect", 0, 0, 1, 0.7, colour=(235, 230, 220))
    c.fill("window-other", "rect", 0.06, 0.1, 0.3, 0.5)
    c.fill("floor-wood", "below", 0.7)
    c.fill("tv", "rect", 0.42, 0.2, 0.68, 0.42)
    c.fill("furniture-other", "rect", 0.38, 0.48, 0.72, 0.7, look="wood")
    c.fill("couch", "rect", 0.05, 0.6, 0.38, 0.92)
    c.fill("potted plant", "ellipse", 0.78, 0.3, 0.96, 0.6)
    c.fill("potted plant", "rect", 0.83, 0.58, 0.91, 0.74, look="stone")
    c.fill("chair", "rect", 0.6, 0.7, 0.64, 0.98, look="wood")
    c.fill("chair", "rect", 0.6, 0.8, 0.74, 0.84, look="wood")
    return ["a living room with a television on a cabinet, a couch and a potted plant",
            "a tidy living room with a tv and a couch", "a room with a wooden floor, a couch, a chair and a tv"]


def coco_bear(c: Canvas):
    c.fill("grass", "rect", 0, 0, 1, 1, colour=(110, 150, 70))
    c.fill("rock", "ellipse", 0.6, 0.62, 1.05, 1.1, look="stone")
    c.fill("bear", "ellipse", 0.18, 0.3, 0.7, 0.78)
    c.fill("bear", "ellipse", 0.12, 0.22, 0.34, 0.48)
    c.fill("bear", "ellipse", 0.13, 0.2, 0.18, 0.27)
    c.fill("bear", "ellipse", 0.27, 0.2, 0.32, 0.27)
    for x in (0.22, 0.32, 0.52, 0.6):
        c.fill("bear", "rect", x, 0.66, x + 0.07, 0.9)
    return ["a large brown bear walking through the grass near a rock", "a brown bear in a grassy field",
            "a bear looks at the camera from the grass"]


def garden(c: Canvas, variant: int):
    """A garden of the `folder` fixture's own classes; six arrangements."""
    horizon = (0.4, 0.46, 0.36, 0.5, 0.42, 0.44)[variant]
    c.fill("sky", "rect", 0, 0, 1, horizon + 0.05)
    c.fill("tree", "below", horizon - 0.07, 0.025, 3 + variant % 3, 0.1 * variant)
    c.fill("lawn", "below", horizon + 0.02, 0.01, 1)

    def house(x, y):
        c.fill("house", "rect", x, y - 0.2, x + 0.3, y + 0.08)
        c.fill("house", "poly", [(x - 0.03, y - 0.18), (x + 0.15, y - 0.36), (x + 0.33, y - 0.18)],
               colour=(120, 60, 45))
        c.windows("house", x + 0.02, y - 0.16, x + 0.28, y + 0.02, 3, 1)

    def flowers(x0, y0, x1, y1, colour):
        c.fill("flowerbed", "ellipse", x0, y0, x1, y1, colour=colour)

    if variant == 0:
        house(0.12, horizon)
        c.fill("path", "poly", [(0.24, horizon + 0.08), (0.3, horizon + 0.08), (0.62, 1), (0.28, 1)])
        flowers(0.66, 0.72, 0.94, 0.9, (220, 90, 140))
        return ["a small house at the end of a garden path, a pink flowerbed on the lawn, trees behind"]
    if variant == 1:
        c.fill("pond", "ellipse", 0.42, horizon + 0.14, 0.92, horizon + 0.38)
        c.fill("path", "poly", [(0.3, horizon + 0.04), (0.34, horizon + 0.04), (0.28, 1), (0.02, 1)])
        c.tree("tree", 0.82, 0.08, horizon + 0.1, 0.16)
        flowers(0.36, 0.78, 0.6, 0.95, (240, 200, 60))
        return ["a garden pond beside a tree, a path on the left and yellow flowers in front"]
    if variant == 2:
        house(0.6, horizon)
        c.fill("pond", "ellipse", 0.05, horizon + 0.18, 0.42, horizon + 0.36)
        c.fill("path", "poly", [(0.72, horizon + 0.08), (0.78, horizon + 0.08), (0.95, 1), (0.6, 1)])
        flowers(0.1, 0.82, 0.34, 0.96, (200, 60, 60))
        flowers(0.4, 0.6, 0.55, 0.7, (230, 120, 200))
        return ["a house on the right with a path to its door, a pond and two flowerbeds on the lawn"]
    if variant == 3:
        c.tree("tree", 0.2, 0.06, 0.78, 0.22)
        c.fill("path", "poly", [(0.6, horizon + 0.04), (0.64, horizon + 0.04), (1, 0.8), (1, 1), (0.84, 1)])
        for k in range(4):
            flowers(0.05 + 0.2 * k, 0.86, 0.2 + 0.2 * k, 0.98, ((220, 90, 140), (240, 200, 60))[k % 2])
        return ["a wide lawn with a big tree, a path to the right and a row of flowerbeds along the front"]
    if variant == 4:
        house(0.35, horizon)
        c.fill("path", "poly", [(0.47, horizon + 0.08), (0.53, horizon + 0.08), (0.66, 1), (0.34, 1)])
        flowers(0.04, 0.66, 0.28, 0.82, (250, 150, 60))
        flowers(0.72, 0.66, 0.96, 0.82, (250, 150, 60))
        return ["a straight path leading to a small house between two orange flowerbeds"]
    c.fill("pond", "ellipse", 0.2, horizon + 0.12, 0.8, horizon + 0.42)
    c.tree("tree", 0.1, 0.12, horizon + 0.12, 0.14)
    c.tree("tree", 0.9, 0.1, horizon + 0.1, 0.15)
    c.fill("path", "poly", [(0, 0.9), (1, 0.86), (1, 0.96), (0, 1)])
    return ["a round pond between two trees, a path crossing the lawn in front"]


# ----------------------------------------------------------------------------
# The fixtures, each in its dataset's layout.
# ----------------------------------------------------------------------------
def _save(path: str, array: np.ndarray, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _render(draw, width, height, raw, seed, *args):
    c = Canvas(width, height, raw, seed)
    caps = draw(c, *args)
    return c.image(), c.label, caps


def write_ade20k(root: str) -> dict:
    base = os.path.join(root, "ADEChallengeData2016")
    scenes = {"train": [ade_street, ade_park, ade_bedroom, ade_lake, ade_kitchen], "val": [ade_house, ade_living]}
    caps = {}
    for split, sub in (("train", "training"), ("val", "validation")):
        for i, draw in enumerate(scenes[split], 1):
            stem = f"ADE_{split}_{i:08d}"
            image, label, caps[stem] = _render(draw, 340, 256, ADE_RAW, i + 100 * (split == "val"))
            _save(os.path.join(base, "images", sub, stem + ".jpg"), image, quality=90)
            _save(os.path.join(base, "annotations", sub, stem + ".png"), label)
    with open(os.path.join(base, "objectInfo150.txt"), "w") as f:
        f.write("Idx\tRatio\tTrain\tVal\tName\n")
    return {"captions": _write_captions(root, "ade20k_caption_train.json", caps)}


CITY_STEMS = {"train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313",
                        "bremen_000000_000019"],
              "val": ["frankfurt_000000_000576", "lindau_000000_000019"]}


def write_cityscapes(root: str) -> dict:
    caps, variant = {}, 0
    for split, stems in CITY_STEMS.items():
        for stem in stems:
            city = stem.split("_")[0]
            image, label, caps[stem] = _render(city_scene, 512, 256, CITY_RAW, variant, variant)
            _save(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"), image)
            _save(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"), label)
            variant += 1
    return {"captions": _write_captions(root, "cityscapes_caption_train.json", caps)}


COCO_IDS = {"train2017": [(9, coco_bowls), (25, coco_giraffe), (30, coco_vase), (34, coco_zebra),
                          (36, coco_umbrella)],
            "val2017": [(139, coco_living), (285, coco_bear)]}


def write_coco_stuff(root: str) -> dict:
    for sub, scenes in COCO_IDS.items():
        doc = {"info": {}, "images": [], "annotations": []}
        for image_id, draw in scenes:
            stem = f"{image_id:012d}"
            image, label, captions = _render(draw, 320, 240, COCO_RAW, image_id)
            _save(os.path.join(root, sub, stem + ".jpg"), image, quality=90)
            _save(os.path.join(root, "stuffthingmaps_trainval2017", sub, stem + ".png"), label)
            doc["images"].append({"id": image_id, "file_name": stem + ".jpg", "height": 240, "width": 320})
            for k, caption in enumerate(captions):
                doc["annotations"].append({"id": 1000 * image_id + k, "image_id": image_id, "caption": caption})
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"captions_{sub}.json"), "w") as f:
            json.dump(doc, f)
    return {}


def write_folder(root: str) -> dict:
    caps, stems = {}, []
    for i in range(6):
        stem = f"garden_{i + 1:02d}"
        image, label, caps[stem] = _render(garden, 256, 192, FOLDER_RAW, i, i)
        ext = ".png" if i % 2 else ".jpg"
        _save(os.path.join(root, "images", stem + ext), image, **({} if ext == ".png" else {"quality": 90}))
        _save(os.path.join(root, "labels", stem + ".png"), label)
        stems.append(stem)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("# a garden dataset\n" + "\n".join(FOLDER_CLASSES) + "\n")
    os.makedirs(os.path.join(root, "splits"), exist_ok=True)
    with open(os.path.join(root, "splits", "train.txt"), "w") as f:
        f.write("\n".join(stems[:4]) + "\n")
    with open(os.path.join(root, "splits", "validation.txt"), "w") as f:
        f.write("\n".join(stems[4:]) + "\n")
    return {"captions": _write_captions(root, "captions.json", caps)}


def _write_captions(root: str, name: str, caps: dict) -> str:
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump({stem: c if len(c) > 1 else c[0] for stem, c in caps.items()}, f, indent=1)
    return path


DATASETS = {"ade20k": (write_ade20k, []), "cityscapes": (write_cityscapes, ["--config.data.resize=(128, 256)"]),
            "coco_stuff": (write_coco_stuff, []), "folder": (write_folder, [])}


# ----------------------------------------------------------------------------
# The data stage on each fixture.
# ----------------------------------------------------------------------------
def run_data_stage(name: str, path: str, workdir: str, data_dir: str, captions: str = None, extra=(),
                   examples: int = PREVIEW_EXAMPLES) -> str:
    cmd = [sys.executable, "-m", "sdsup.train", "--config=configs/scenes.py:smoke", f"--workdir={workdir}",
           "--only=data", f"--config.data.name={name}", f"--config.data.path={path}",
           f"--config.data.data_dir={data_dir}", f"--config.data.image_size={IMAGE_SIZE}",
           f"--config.preview_examples={examples}", *extra]
    if captions:
        cmd.append(f"--config.data.captions={captions}")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the data stage failed for {name} (exit {result.returncode}):\n  {' '.join(cmd)}\n"
                           f"{result.stderr[-4000:]}")
    return os.path.join(workdir, "data", "preview.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(DATASETS), help="comma-separated datasets")
    parser.add_argument("--keep", default=None, help="write fixtures and workdirs here and keep them")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(DATASETS)
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}; choose from {list(DATASETS)}")
    tmp = args.keep or tempfile.mkdtemp(prefix="sdsup_previews_")
    os.makedirs(args.out, exist_ok=True)
    failed = []
    try:
        for name in names:
            write, extra = DATASETS[name]
            path = os.path.join(tmp, "fixtures", name)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            opts = write(path)
            start = time.time()
            target = os.path.join(args.out, f"{name}.png")
            try:
                for examples in (PREVIEW_EXAMPLES, 3, 2):  # fewer rows while the picture is too large
                    workdir = os.path.join(tmp, "workdirs", name)
                    shutil.rmtree(workdir, ignore_errors=True)
                    preview = run_data_stage(name, path, workdir, os.path.join(tmp, "tfds"), opts.get("captions"),
                                             extra, examples)
                    if os.path.getsize(preview) <= MAX_BYTES:
                        break
                shutil.copyfile(preview, target)
            except RuntimeError as e:
                failed.append(name)
                print(e, file=sys.stderr)
                continue
            print(f"{name}: {target} ({os.path.getsize(target) // 1024} KB, {examples} rows, "
                  f"{time.time() - start:.0f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
