"""Procedural synthetic scenes: the embedded default dataset.

A scene is a small *program*: a ground type with optional mountains, lake and
road ("stuff"), plus up to five groups of objects ("things") placed in three
horizontal slots (left, center, right) either in the sky (sun, cloud) or on the
ground (tree, house, car, rock). The program is sampled from a seed, rendered
to an RGB image and a label map, and described by a caption from a fixed
grammar (`docs/scenes.md` has the full grammar with examples):

  caption  := stuff "." { group "." }
  stuff    := "sky over" GROUND [ "with" EXTRA { "," EXTRA } [ "and" EXTRA ] ]
  EXTRA    := "mountains on the horizon" | "a lake" POSITION | "a road along the bottom"
  group    := DET [SIZE] [COLOUR] NOUN LOCATION
  LOCATION := POSITION | ("left of" | "right of" | "above" | "below") "the" NOUN
  POSITION := "on the left" | "in the center" | "on the right"          (ground)
            | "at the top left" | "at the top" | "at the top right"       (sky)

A caption names every class present and where it is, so text -> layout mIoU
is meaningful; positions, sizes, shapes and textures keep some random freedom.
Colours change appearance only, never the class.

Held-out compositions: `HELD_OUT` lists spatial facts (class, relation, class)
that never occur in the train and validation splits and occur, stated in the
caption, in every test example. They are closed under horizontal flipping so
that flip augmentation cannot leak them into training.

Everything here is NumPy; `render` works at any image size because shapes are
defined in normalised coordinates (x right, y down, both in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import List, Optional, Tuple

import numpy as np

from sdsup.data.facts import Fact

# ----------------------------------------------------------------------------
# Classes and palette: dataset metadata every other part reads.
# ----------------------------------------------------------------------------
STUFF_CLASSES = ("sky", "mountain", "grass", "sand", "snow", "water", "road")
THING_CLASSES = ("sun", "cloud", "tree", "house", "car", "rock")
CLASS_NAMES = STUFF_CLASSES + THING_CLASSES
CLASS_ID = {name: i for i, name in enumerate(CLASS_NAMES)}
IGNORE_ID = 255

# Colours of the *label* visualisation (legends, colour-coded layouts and the
# ControlNet colour hint). Chosen to be distinct from each other.
PALETTE = np.array(
    [
        (70, 130, 180),  # sky
        (150, 100, 60),  # mountain
        (107, 190, 35),  # grass
        (230, 205, 140),  # sand
        (225, 240, 255),  # snow
        (20, 60, 220),  # water
        (128, 64, 128),  # road
        (255, 200, 0),  # sun
        (170, 170, 170),  # cloud
        (0, 100, 0),  # tree
        (220, 20, 60),  # house
        (0, 0, 142),  # car
        (90, 60, 90),  # rock
    ],
    dtype=np.uint8,
)

GROUNDS = ("grass", "sand", "snow")
SKY_THINGS = ("sun", "cloud")
GROUND_THINGS = ("tree", "house", "car", "rock")
SLOTS = ("left", "center", "right")
SLOT_X = (0.2, 0.5, 0.8)
SIZES = ("small", "medium", "large")
SIZE_SCALE = {"small": 0.7, "medium": 1.0, "large": 1.35}

# Appearance colours that captions may name.
COLOURS = {
    "red": (205, 45, 40),
    "orange": (240, 140, 30),
    "yellow": (245, 215, 50),
    "green": (45, 150, 55),
    "blue": (40, 80, 205),
    "purple": (130, 60, 170),
    "pink": (240, 150, 185),
    "white": (242, 242, 242),
    "gray": (125, 125, 125),
    "black": (35, 35, 35),
    "brown": (125, 80, 40),
}
THING_COLOURS = {
    "sun": ("yellow", "orange", "red", "white"),
    "cloud": ("white", "gray", "pink"),
    "tree": ("green", "orange", "red", "yellow"),
    "house": ("red", "blue", "white", "yellow", "brown", "gray", "green", "pink"),
    "car": ("red", "blue", "white", "black", "yellow", "green", "gray", "orange", "purple"),
    "rock": ("gray", "brown", "black"),
}
MAX_COUNT = {"sun": 1, "cloud": 2, "tree": 2, "house": 2, "car": 2, "rock": 2}

LEFT_OF, ABOVE = "left of", "above"
# Flip-closed: a horizontal pair is held out in both orders.
HELD_OUT = frozenset(
    {
        ("car", LEFT_OF, "tree"),
        ("tree", LEFT_OF, "car"),
        ("rock", LEFT_OF, "house"),
        ("house", LEFT_OF, "rock"),
        ("sun", ABOVE, "car"),
        ("cloud", ABOVE, "rock"),
    }
)

SPLITS = ("train", "validation", "test")
_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}


# ----------------------------------------------------------------------------
# Scene programs.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Group:
    """One or two objects of a class in one slot."""

    cls: str
    slot: int  # index into SLOTS
    count: int
    size: str
    colour: str
    colour_named: bool  # whether the caption names the colour
    ref: Optional[int] = None  # group index the caption places this one against

    @property
    def layer(self) -> str:
        return "sky" if self.cls in SKY_THINGS else "ground"


@dataclasses.dataclass
class Scene:
    ground: str
    mountains: bool
    lake_slot: Optional[int]
    road: bool
    groups: list  # list[Group], in caption order

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        d = json.loads(text)
        d["groups"] = [Group(**g) for g in d["groups"]]
        return cls(**d)


def facts(scene: Scene) -> set:
    """Spatial facts (class, relation, class) that hold in the scene's layout.

    Only "left of" (within the sky or within the ground) and "above" (a sky group
    over a ground group in the same slot) are canonical; "right of" and "below"
    are their converses.
    """
    out = set()
    for a in scene.groups:
        for b in scene.groups:
            if a is b:
                continue
            if a.layer == b.layer and a.slot < b.slot:
                out.add((a.cls, LEFT_OF, b.cls))
            if a.layer == "sky" and b.layer == "ground" and a.slot == b.slot:
                out.add((a.cls, ABOVE, b.cls))
    return out


def _relation_between(d: Group, r: Group) -> Optional[str]:
    """The caption words that place group d relative to group r, if any."""
    if d.layer == r.layer and d.slot != r.slot:
        return "left of" if d.slot < r.slot else "right of"
    if d.slot == r.slot and d.layer != r.layer:
        return "above" if d.layer == "sky" else "below"
    return None


def sample_scene(rng: np.random.Generator, split: str, max_tries: int = 1000) -> Scene:
    """Samples a scene program for a split (rejection against HELD_OUT)."""
    for _ in range(max_tries):
        scene = _sample_unconstrained(rng)
        held = facts(scene) & HELD_OUT
        if split == "test":
            if held:
                _order_for_held_out(scene, sorted(held)[rng.integers(len(held))], rng)
                return scene
        elif not held:
            return scene
    raise RuntimeError(f"could not sample a {split} scene in {max_tries} tries")


def _sample_unconstrained(rng: np.random.Generator) -> Scene:
    n_ground = int(rng.integers(1, 4))
    n_sky = int(rng.choice(3, p=(0.3, 0.45, 0.25)))
    groups = []
    for layer_classes, n in ((GROUND_THINGS, n_ground), (SKY_THINGS, n_sky)):
        classes = rng.permutation(layer_classes)[:n]
        slots = rng.permutation(3)[:n]
        for cls, slot in zip(classes, slots):
            cls = str(cls)
            count = 2 if (MAX_COUNT[cls] > 1 and rng.random() < 0.25) else 1
            colours = THING_COLOURS[cls]
            groups.append(
                Group(
                    cls=cls,
                    slot=int(slot),
                    count=count,
                    size=SIZES[int(rng.choice(3, p=(0.3, 0.4, 0.3)))],
                    colour=str(colours[rng.integers(len(colours))]),
                    colour_named=bool(rng.random() < 0.6),
                )
            )
    order = rng.permutation(len(groups))
    groups = [groups[i] for i in order]
    scene = Scene(
        ground=str(GROUNDS[rng.integers(len(GROUNDS))]),
        mountains=bool(rng.random() < 0.4),
        lake_slot=int(rng.integers(3)) if rng.random() < 0.3 else None,
        road=bool(rng.random() < 0.3),
        groups=groups,
    )
    # Each later group is placed against an earlier one when the layout allows.
    for i, g in enumerate(groups):
        candidates = [j for j in range(i) if _relation_between(g, groups[j])]
        if candidates and rng.random() < 0.6:
            g.ref = int(candidates[rng.integers(len(candidates))])
    return scene


def _order_for_held_out(scene: Scene, fact, rng: np.random.Generator) -> None:
    """Reorders groups so the caption states `fact` as a relative placement."""
    subject, _, obj = fact
    by_cls = {g.cls: g for g in scene.groups}
    first, second = (by_cls[obj], by_cls[subject])
    if rng.random() < 0.5:
        first, second = second, first
    rest = [g for g in scene.groups if g is not first and g is not second]
    cut = int(rng.integers(len(rest) + 1))
    groups = rest[:cut] + [first, second] + rest[cut:]
    for g in groups:
        g.ref = None
    for i, g in enumerate(groups):
        if g is second:
            g.ref = i - 1
        else:
            candidates = [j for j in range(i) if _relation_between(g, groups[j])]
            if candidates and rng.random() < 0.6:
                g.ref = int(candidates[rng.integers(len(candidates))])
    scene.groups = groups


# ----------------------------------------------------------------------------
# Captions.
# ----------------------------------------------------------------------------
_GROUND_POS = ("on the left", "in the center", "on the right")
_SKY_POS = ("at the top left", "at the top", "at the top right")


def _noun(cls: str, count: int) -> str:
    if count == 1:
        return cls
    return cls + ("es" if cls.endswith("s") else "s")


def caption(scene: Scene) -> str:
    extras = []
    if scene.mountains:
        extras.append("mountains on the horizon")
    if scene.lake_slot is not None:
        extras.append("a lake " + _GROUND_POS[scene.lake_slot])
    if scene.road:
        extras.append("a road along the bottom")
    stuff = f"sky over {scene.ground}"
    if extras:
        tail = extras[-1] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1]
        stuff += " with " + tail
    sentences = [stuff]
    for g in scene.groups:
        words = []
        if g.size != "medium":
            words.append(g.size)
        if g.colour_named:
            words.append(g.colour)
        words.append(_noun(g.cls, g.count))
        if g.count == 2:
            det = "two"
        else:
            det = "an" if words[0][0] in "aeiou" else "a"
        if g.ref is None:
            where = (_SKY_POS if g.layer == "sky" else _GROUND_POS)[g.slot]
        else:
            r = scene.groups[g.ref]
            where = f"{_relation_between(g, r)} the {_noun(r.cls, r.count)}"
        sentences.append(" ".join([det] + words + [where]))
    return ". ".join(sentences) + "."


def grammar_words() -> list:
    """Every word and punctuation token the caption grammar can produce."""
    words = set("sky over with and mountains on the horizon a an lake road along bottom".split())
    words |= set(" ".join(_GROUND_POS + _SKY_POS).split())
    words |= set("two left right of above below".split())
    words |= set(GROUNDS) | set(SIZES) | set(COLOURS)
    for cls in THING_CLASSES:
        words |= {_noun(cls, 1), _noun(cls, 2)}
    words |= {".", ","}
    words.discard("medium")  # the default size is never spoken
    return sorted(words)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(text: str) -> str:
    """The caption of a horizontally flipped image."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


def caption_relations(record: dict) -> List[Tuple[str, str, str]]:
    """(class, relation, class) that a record's caption states ("a car left of the tree"), from its scene program."""
    scene = Scene.from_json(_text(record["scene"]))
    out = []
    for g in scene.groups:
        if g.ref is not None:
            r = scene.groups[g.ref]
            rel = _relation_between(g, r)
            if rel:
                out.append((g.cls, rel, r.cls))
    return out


def caption_facts(record: dict) -> List[Fact]:
    """Every fact a record's caption states, from its scene program (sdsup.data.facts): the classes it names,
    "two" as two, absolute positions, relations (the placements and "sky over <ground>") and named colours."""
    scene = Scene.from_json(_text(record["scene"]))
    out = [Fact("object", "sky", "sky"), Fact("object", scene.ground, scene.ground),
           Fact("relation", f"sky over {scene.ground}", "sky", relation="above", other=scene.ground)]
    if scene.mountains:
        out.append(Fact("object", "mountains", "mountain"))
    if scene.lake_slot is not None:
        out += [Fact("object", "a lake", "water"),
                Fact("position", f"a lake {_GROUND_POS[scene.lake_slot]}", "water", where=SLOTS[scene.lake_slot])]
    if scene.road:
        out += [Fact("object", "a road", "road"), Fact("position", "a road along the bottom", "road", where="bottom")]
    for g in scene.groups:
        noun = _noun(g.cls, g.count)
        common = dict(cls=g.cls, count=g.count, size=g.size)
        out.append(Fact("object", noun, **common))
        if g.count > 1:
            out.append(Fact("count", f"two {noun}", **common))
        if g.ref is None:
            where = (_SKY_POS if g.layer == "sky" else _GROUND_POS)[g.slot]
            out.append(Fact("position", f"{noun} {where}", where=SLOTS[g.slot], **common))
        else:
            r = scene.groups[g.ref]
            relation = _relation_between(g, r)
            out.append(Fact("relation", f"{noun} {relation} the {_noun(r.cls, r.count)}", relation=relation,
                            other=r.cls, **common))
        if g.colour_named:
            choices = tuple((c, tuple(COLOURS[c])) for c in THING_COLOURS[g.cls])
            out.append(Fact("colour", f"{g.colour} {noun}", colour=g.colour, colour_choices=choices, **common))
    return out


def record_stats(record: dict) -> dict:
    """The scenes' own statistic of an example: whether it holds a held-out composition."""
    return {"examples_with_held_out_composition": int(bool(facts(Scene.from_json(_text(record["scene"]))) & HELD_OUT))}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# Prompts the grammar never writes, for reports: other word orders, pairs held out of training
# (HELD_OUT), a stuff class as the only content.
NOVEL_PROMPTS = (
    "a red car left of a green tree. sky over grass.",
    "sky over sand. a gray rock on the left. a house right of the rock.",
    "a white cloud above a black rock. sky over snow with a road along the bottom.",
    "sky over grass with a lake in the center and mountains on the horizon.",
    "the sun at the top right above a car on the right. sky over sand.",
    "two houses. sky over snow.",
    "a small car right of a big house. sky over snow with mountains on the horizon.",
    "three clouds in the sky. sky over sand with a road along the bottom.",
)


def flip_scene(scene: Scene) -> Scene:
    groups = [dataclasses.replace(g, slot=2 - g.slot) for g in scene.groups]
    lake = None if scene.lake_slot is None else 2 - scene.lake_slot
    return dataclasses.replace(scene, groups=groups, lake_slot=lake)


# ----------------------------------------------------------------------------
# Rendering: painter's algorithm at 2x, then 2x2 pooling.
# ----------------------------------------------------------------------------
class _Canvas:
    """Image and label buffers at twice the output size (n = 2 * size)."""

    def __init__(self, size: int):
        n = 2 * size
        self.size, self.n = size, n
        self.coords = (np.arange(n, dtype=np.float32) + 0.5) / n
        self.image = np.empty((n, n, 3), np.float32)
        self.label = np.empty((n, n), np.uint8)

    def region(self, x0: float, x1: float, y0: float, y1: float) -> "_Region":
        """The pixels whose centres may fall in [x0, x1] x [y0, y1]."""
        n = self.n
        c0, c1 = max(0, int(x0 * n)), min(n, int(np.ceil(x1 * n)) + 1)
        r0, r1 = max(0, int(y0 * n)), min(n, int(np.ceil(y1 * n)) + 1)
        return _Region(self, r0, max(r0, r1), c0, max(c0, c1))

    def result(self):
        im = self.image
        img = 0.25 * (im[0::2, 0::2] + im[0::2, 1::2] + im[1::2, 0::2] + im[1::2, 1::2])
        img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        # A pixel takes the class that covers at least three of its four
        # sub-samples; boundary pixels split 2-2 or 2-1-1 are ignore.
        l = self.label
        a, b, c, d = l[0::2, 0::2], l[0::2, 1::2], l[1::2, 0::2], l[1::2, 1::2]
        count_a = 1 + (a == b) + (a == c) + (a == d)
        count_b = 1 + (b == a) + (b == c) + (b == d)
        label = np.where(count_a >= 3, a, np.where(count_b >= 3, b, IGNORE_ID)).astype(np.uint8)
        return img, label


class _Region:
    """A rectangle of the canvas: shapes are evaluated and painted only here."""

    def __init__(self, cv: _Canvas, r0: int, r1: int, c0: int, c1: int):
        self.cv, self.rows, self.cols = cv, slice(r0, r1), slice(c0, c1)
        self.y = cv.coords[r0:r1, None]
        self.x = cv.coords[None, c0:c1]
        self.shape = (r1 - r0, c1 - c0)

    def paint(self, mask, cls: str, colour) -> None:
        """Paints `colour` (RGB, or an image broadcastable to the region) where `mask`."""
        if self.shape[0] == 0 or self.shape[1] == 0:
            return
        mask = np.broadcast_to(mask, self.shape)
        # copyto broadcasts mask and colour; much faster than fancy indexing.
        np.copyto(self.cv.image[self.rows, self.cols], colour, where=mask[..., None])
        np.copyto(self.cv.label[self.rows, self.cols], CLASS_ID[cls], where=mask, casting="unsafe")

    def texture(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """A random window of the stationary texture `kind`, the region's size."""
        bank = _texture_bank(kind, self.cv.n)
        oy, ox = rng.integers(0, self.cv.n, 2)
        return bank[oy + self.rows.start: oy + self.rows.stop, ox + self.cols.start: ox + self.cols.stop]


def _value_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth noise of unit scale on an n x n grid with `cells` cells a side."""
    g = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, n, endpoint=False, dtype=np.float32)
    i = t.astype(np.int32)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = g[:, i] * (1 - f) + g[:, i + 1] * f
    return rows[i] * (1 - f)[:, None] + rows[i + 1] * f[:, None]


def _rgb(c) -> np.ndarray:
    return np.asarray(c, np.float32)


_BANKS: dict = {}


def _texture_bank(kind: str, n: int) -> np.ndarray:
    """A (2n, 2n, 3) tile of a stationary texture, made once per process.

    Examples take random n x n windows of it, which is what makes rendering
    cheap; the bank's own seed is fixed, so datasets stay deterministic.
    """
    key = (kind, n)
    if key not in _BANKS:
        rng = np.random.default_rng([7, n, STUFF_CLASSES.index(kind) if kind in STUFF_CLASSES else 99])
        m = 2 * n
        u = (np.arange(m, dtype=np.float32) + 0.5) / n  # same frequency scale as the canvas
        y, x = u[:, None], u[None, :]
        fine = rng.standard_normal((m, m, 1), dtype=np.float32)
        smooth = _value_noise(rng, m, 12)[..., None]
        if kind == "sky":
            tex = 3 * fine
        elif kind == "mountain":
            stripes = np.sin(2 * np.pi * 14 * (0.7 * x + y))[..., None]
            tex = _rgb((118, 104, 96)) + 16 * stripes + 8 * smooth + 5 * fine
        elif kind == "grass":
            blades = rng.standard_normal((1, m, 1), dtype=np.float32)
            tex = _rgb((72, 150, 52)) + _rgb((8, 22, 6)) * blades + 10 * smooth + 4 * fine
        elif kind == "sand":
            dunes = np.sin(2 * np.pi * (6 * x + 2.5 * np.sin(2 * np.pi * 2 * y)))[..., None]
            tex = _rgb((222, 196, 140)) + 12 * dunes + 9 * fine
        elif kind == "snow":
            tex = _rgb((236, 241, 250)) + _rgb((5, 4, 2)) * smooth + 2 * fine
        elif kind == "water":
            waves = np.sin(2 * np.pi * (40 * y + 1.5 * np.sin(2 * np.pi * 3 * x)))[..., None]
            tex = _rgb((40, 95, 190)) + _rgb((14, 18, 22)) * waves + 4 * fine
        elif kind == "road":
            tex = _rgb((78, 78, 82)) + 5 * fine
        elif kind == "shade":  # zero-mean modulation for things' surfaces
            tex = np.broadcast_to(_value_noise(rng, m, 20)[..., None], (m, m, 3))
        else:
            raise ValueError(f"unknown texture {kind!r}")
        _BANKS[key] = np.ascontiguousarray(np.broadcast_to(tex, (m, m, 3)), dtype=np.float32)
    return _BANKS[key]


def render(scene: Scene, size: int, rng: np.random.Generator):
    """Renders a scene to (image uint8 [size, size, 3], label uint8 [size, size])."""
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    cv = _Canvas(size)
    horizon = float(rng.uniform(0.38, 0.52))

    sky = cv.region(0, 1, 0, 1)
    t = np.clip(sky.y / horizon, 0, 1)[..., None]
    sky.paint(True, "sky", _rgb((70, 130, 215)) * (1 - t) + _rgb((175, 210, 242)) * t + sky.texture("sky", rng))

    sky_groups = [g for g in scene.groups if g.layer == "sky"]
    for g in sorted(sky_groups, key=lambda g: g.cls != "sun"):  # sun behind clouds
        cy = float(rng.uniform(0.1, 0.18))
        for cx, scale in _instances(g, rng):
            _DRAW[g.cls](cv, rng, cx, cy, scale, _rgb(COLOURS[g.colour]))

    if scene.mountains:
        n_peaks = int(rng.integers(3, 6))
        px = rng.uniform(0, 1, n_peaks).astype(np.float32)
        ph = rng.uniform(0.06, 0.15, n_peaks).astype(np.float32)
        slope = float(rng.uniform(0.5, 0.9))
        reg = cv.region(0, 1, horizon - 0.16, horizon)
        ridge = np.max(ph[:, None] - slope * np.abs(reg.x - px[:, None]), axis=0)
        mask = (reg.y >= horizon - np.maximum(ridge, 0.0)) & (reg.y < horizon)
        reg.paint(mask, "mountain", reg.texture("mountain", rng))

    ground = cv.region(0, 1, horizon, 1)
    ground.paint(ground.y >= horizon, scene.ground, ground.texture(scene.ground, rng))

    if scene.lake_slot is not None:
        cx = SLOT_X[scene.lake_slot] + rng.uniform(-0.04, 0.04)
        cy = horizon + (1 - horizon) * rng.uniform(0.22, 0.3)
        rx, ry = rng.uniform(0.14, 0.2), (1 - horizon) * rng.uniform(0.1, 0.14)
        reg = cv.region(cx - rx, cx + rx, cy - ry, cy + ry)
        reg.paint(((reg.x - cx) / rx) ** 2 + ((reg.y - cy) / ry) ** 2 <= 1, "water", reg.texture("water", rng))

    baseline = horizon + (1 - horizon) * float(rng.uniform(0.52, 0.62))
    car_baseline = baseline + 0.04
    if scene.road:
        top = float(rng.uniform(0.82, 0.85))
        bottom = float(rng.uniform(0.95, 0.98))
        mid = (top + bottom) / 2
        reg = cv.region(0, 1, top, bottom)
        dash = (np.abs(reg.y - mid) < 0.008) & ((reg.x * 8 + 0.25) % 1 < 0.5)
        tex = np.where(dash[..., None], _rgb((230, 200, 45)), reg.texture("road", rng))
        reg.paint((reg.y >= top) & (reg.y <= bottom), "road", tex)
        baseline = min(baseline, top - 0.01)
        car_baseline = mid + 0.025

    # Ground things, back to front.
    instances = []
    for g in scene.groups:
        if g.layer != "ground":
            continue
        base = car_baseline if g.cls == "car" else baseline
        for cx, scale in _instances(g, rng):
            instances.append((base + float(rng.uniform(-0.02, 0.02)), cx, scale, g))
    for base, cx, scale, g in sorted(instances, key=lambda t: t[0]):
        _DRAW[g.cls](cv, rng, cx, base, scale, _rgb(COLOURS[g.colour]))
    return cv.result()


def _instances(g: Group, rng: np.random.Generator):
    cx = SLOT_X[g.slot] + float(rng.uniform(-0.04, 0.04))
    scale = SIZE_SCALE[g.size] * float(rng.uniform(0.92, 1.08))
    if g.count == 1:
        return [(cx, scale)]
    spread = 0.075 * scale
    return [(cx - spread, 0.75 * scale), (cx + spread, 0.75 * scale)]


def _draw_sun(cv, rng, cx, cy, scale, colour):
    r = 0.07 * scale
    reg = cv.region(cx - r, cx + r, cy - r, cy + r)
    d2 = (reg.x - cx) ** 2 + (reg.y - cy) ** 2
    glow = np.clip(1 - np.sqrt(d2) / r, 0, 1)[..., None]
    reg.paint(d2 <= r * r, "sun", colour * (0.85 + 0.15 * glow) + 30 * glow)


def _draw_cloud(cv, rng, cx, cy, scale, colour):
    w, h = 0.22 * scale, 0.08 * scale
    reg = cv.region(cx - 0.6 * w, cx + 0.6 * w, cy - 0.8 * h, cy + 0.4 * h)
    mask = np.zeros(reg.shape, bool)
    for dx, dy, r in ((-0.3, 0.1, 0.45), (0.0, -0.15, 0.6), (0.3, 0.1, 0.45)):
        r = r * h * float(rng.uniform(0.9, 1.1))
        mask |= (reg.x - (cx + dx * w)) ** 2 + (reg.y - (cy + dy * h)) ** 2 <= r * r
    mask &= reg.y <= cy + 0.35 * h
    reg.paint(mask, "cloud", colour * (1.0 - 0.12 * np.clip((reg.y - cy) / h, 0, 1))[..., None])


def _draw_tree(cv, rng, cx, base, scale, colour):
    trunk_h, trunk_w = 0.12 * scale, 0.035 * scale
    r = 0.1 * scale * float(rng.uniform(0.9, 1.1))
    cy = base - trunk_h - 0.8 * r
    reg = cv.region(cx - r, cx + r, cy - r, base)
    trunk = (np.abs(reg.x - cx) <= trunk_w / 2) & (reg.y <= base) & (reg.y >= base - trunk_h - r)
    reg.paint(trunk, "tree", _rgb((100, 65, 35)))
    canopy = ((reg.x - cx) / (0.9 * r)) ** 2 + ((reg.y - cy) / r) ** 2 <= 1
    reg.paint(canopy, "tree", colour + 22 * reg.texture("shade", rng))


def _draw_house(cv, rng, cx, base, scale, colour):
    w, body_h, roof_h = 0.22 * scale, 0.15 * scale, 0.09 * scale
    top = base - body_h
    reg = cv.region(cx - 0.6 * w, cx + 0.6 * w, top - roof_h, base)
    x, y = reg.x, reg.y
    body = (np.abs(x - cx) <= w / 2) & (y <= base) & (y >= top)
    roof = (y < top) & (y >= top - roof_h) & (np.abs(x - cx) <= (y - (top - roof_h)) / roof_h * (0.6 * w))
    reg.paint(body, "house", colour)
    reg.paint(roof, "house", 0.5 * colour + _rgb((70, 20, 15)))
    door = (np.abs(x - cx) <= 0.12 * w) & (y <= base) & (y >= base - 0.55 * body_h)
    reg.paint(door, "house", _rgb((70, 45, 30)))
    for wx in (-0.3, 0.3):
        win = (np.abs(x - (cx + wx * w)) <= 0.09 * w) & (np.abs(y - (top + 0.4 * body_h)) <= 0.15 * body_h)
        reg.paint(win, "house", _rgb((200, 228, 250)))


def _draw_car(cv, rng, cx, base, scale, colour):
    w, body_h, cab_h = 0.2 * scale, 0.055 * scale, 0.05 * scale
    wheel_r = 0.024 * scale
    axle = base - wheel_r
    body_top = axle - body_h * 0.6
    reg = cv.region(cx - 0.5 * w, cx + 0.5 * w, body_top - cab_h, base)
    x, y = reg.x, reg.y
    body = (np.abs(x - cx) <= w / 2) & (y <= axle + 0.3 * wheel_r) & (y >= body_top)
    cab_w = (y - (body_top - cab_h)) / cab_h * 0.12 * w + 0.27 * w
    cab = (y < body_top) & (y >= body_top - cab_h) & (np.abs(x - cx) <= cab_w)
    reg.paint(body | cab, "car", colour)
    win = cab & (np.abs(x - cx) <= cab_w - 0.04 * w) & (y >= body_top - 0.8 * cab_h)
    reg.paint(win, "car", _rgb((175, 210, 235)))
    for wx in (-0.3, 0.3):
        wheel = (x - (cx + wx * w)) ** 2 + (y - axle) ** 2 <= wheel_r ** 2
        reg.paint(wheel, "car", _rgb((25, 25, 25)))


def _draw_rock(cv, rng, cx, base, scale, colour):
    w, h = 0.14 * scale, 0.09 * scale
    cy = base - 0.45 * h
    reg = cv.region(cx - 0.7 * w, cx + 0.7 * w, cy - 0.7 * h, base)
    dx, dy = (reg.x - cx) / (w / 2), (reg.y - cy) / (h / 2)
    theta = np.arctan2(dy, dx)
    phases = rng.uniform(0, 2 * np.pi, 2)
    radius = 1 + 0.12 * np.sin(3 * theta + phases[0]) + 0.07 * np.sin(5 * theta + phases[1])
    mask = (dx ** 2 + dy ** 2 <= radius ** 2) & (reg.y <= base)
    tex = (colour + 14 * reg.texture("shade", rng)) * (1.1 - 0.25 * np.clip(dy, -1, 1))[..., None]
    reg.paint(mask, "rock", tex)


_DRAW = {
    "sun": _draw_sun,
    "cloud": _draw_cloud,
    "tree": _draw_tree,
    "house": _draw_house,
    "car": _draw_car,
    "rock": _draw_rock,
}

# ----------------------------------------------------------------------------
# Examples.
# ----------------------------------------------------------------------------
def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split`: independent of every other."""
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index])


def make_example(seed: int, split: str, index: int, image_size: int) -> dict:
    """Example `index` of `split`, a pure function of its arguments."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = example_rng(seed, split, index)
    scene = sample_scene(rng, split)
    image, label = render(scene, image_size, rng)
    return {
        "image": image,
        "label": label,
        "caption": caption(scene),
        "scene": scene.to_json(),
    }


def make_examples(job) -> list:
    """Examples [start, stop) of a split: `job` is (seed, split, start, stop, image_size)."""
    seed, split, start, stop, image_size = job
    return [make_example(seed, split, i, image_size) for i in range(start, stop)]
