"""Faithfulness (GenEval-style): the share of what each caption states that holds in the image.

Facts come from the dataset (`sdsup.data.facts`: the scenes state objects, counts, positions, relations
and colours exactly; other datasets the classes their captions name). They are checked on a label map: the
evaluation segmenter's reading of a generated or real image, a generated layout, or the ground truth (the
check's own ceiling), and colours on the image's pixels.

Reading objects off a label map:
  * a class's *objects* are its connected components (8-neighbour) of at least `min_area` pixels; smaller
    specks are noise, neither present nor counted (a small rock is about a dozen pixels at 64x64, so the
    floor is a fraction of the smallest true instance, measured in calibration);
  * touching instances are one component (the scenes' pairs of houses, cars and clouds overlap by
    construction), so a count of two is also read off a single component wider than the class's widest
    single instance of the stated size: the threshold is the midpoint between the median widths of one
    and of a pair, measured on ground-truth training maps (`Calibration.fit`);
  * positions and relations use the centre of the class's objects (left/centre/right thirds; "bottom" is
    the lower third; "left of"/"above" compare centres), as `sdsup.evaluation.layout.relation_holds` does;
  * a colour holds when the median pixel of the class's objects is nearer the named colour than any other
    colour that class comes in.

Coherence, for maps that should hold solid objects: `stray_share` (the share of thing pixels outside the
named things' largest components, unnamed things included), `components_per_thing` (all components of
named thing classes per named instance; 1.0 is solid) and `unnamed_things` (maps holding an object of a
thing class the caption never names).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from sdsup.data.facts import KINDS, Fact, named_class_facts

_EIGHT = np.ones((3, 3), bool)
# When calibration saw no instance of a class: the fallback floor, in pixels of a 64x64 map, scaled by area.
_DEFAULT_MIN_AREA = 4
_MIN_AREA_SHARE = 0.5  # of the smallest true instance seen in calibration: specks below it are noise
BOOTSTRAP = 2000


def calibrate(dataset, examples: int = 512, batch_size: int = 32, full_frame: bool = False) -> "Calibration":
    """The check's object geometry from the first `examples` ground-truth maps of a dataset's train split
    (at the evaluation's geometry: centred crops, or whole frames with `full_frame`)."""
    maps, stated = [], []
    source = dataset.source("train")
    for batch in dataset.eval_batches("train", batch_size, limit=examples, full_frame=full_frame):
        for j in np.nonzero(batch["mask"])[0]:
            maps.append(batch["label"][j])
            stated.append(facts_of(dataset.spec, source[int(batch["index"][j])], batch["caption"][j]))
    return Calibration.fit(maps, stated, dataset.spec.class_names)


def facts_of(spec, record: dict, caption: str) -> List[Fact]:
    """The facts a record's caption states: the dataset's own (`caption_facts`) or the classes it names."""
    if spec.caption_facts is not None:
        return list(spec.caption_facts(record))
    return named_class_facts(caption, spec.class_names, spec.class_phrases)


@dataclasses.dataclass
class Calibration:
    """Per-class geometry of true instances on ground-truth maps at one resolution."""

    shape: tuple
    min_area: Dict[str, float]
    pair_width: Dict[tuple, float]  # (class, size) -> width above which one component is read as two

    @classmethod
    def fit(cls, maps: Sequence[np.ndarray], facts: Sequence[Sequence[Fact]], class_names: Sequence[str]):
        """From ground-truth maps and their facts: the smallest object of each class and the width that
        separates one instance from a pair, per (class, stated size)."""
        if not len(maps):
            raise ValueError("calibration needs at least one ground-truth map")
        areas: Dict[str, list] = {}
        widths: Dict[tuple, list] = {}
        for label, stated in zip(maps, facts):
            for f in stated:
                if f.kind != "object" or f.cls not in class_names:
                    continue
                comps = _components(label == class_names.index(f.cls), 1)
                if not comps:
                    continue
                if f.count == 1:
                    areas.setdefault(f.cls, []).append(sum(c.area for c in comps))
                widths.setdefault((f.cls, f.size, f.count), []).append(_width(comps))
        min_area = {c: max(1.0, _MIN_AREA_SHARE * float(np.min(a))) for c, a in areas.items()}
        pair_width = {}
        for (c, size, count), w in widths.items():
            if count == 2 and (c, size, 1) in widths:
                pair_width[(c, size)] = 0.5 * (float(np.median(widths[(c, size, 1)])) + float(np.median(w)))
        return cls(shape=tuple(np.shape(maps[0])), min_area=min_area, pair_width=pair_width)

    def floor(self, cls_name: str, shape) -> float:
        scale = (shape[0] * shape[1]) / float(self.shape[0] * self.shape[1])
        return self.min_area.get(cls_name, _DEFAULT_MIN_AREA * (self.shape[0] * self.shape[1]) / 4096.0) * scale

    def pair_threshold(self, cls_name: str, size: str, shape) -> Optional[float]:
        width = self.pair_width.get((cls_name, size))
        return None if width is None else width * shape[1] / float(self.shape[1])


@dataclasses.dataclass(frozen=True)
class _Component:
    area: int
    x0: int
    x1: int  # exclusive
    cx: float
    cy: float


def _components(mask: np.ndarray, floor: float) -> List[_Component]:
    """Connected components of `mask` with at least `floor` pixels, largest first."""
    if not mask.any():
        return []
    labels, n = ndimage.label(mask, structure=_EIGHT)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[sl] == i
        area = int(region.sum())
        if area < floor:
            continue
        ys, xs = np.nonzero(region)
        out.append(_Component(area, sl[1].start, sl[1].stop, float(xs.mean() + sl[1].start + 0.5),
                              float(ys.mean() + sl[0].start + 0.5)))
    return sorted(out, key=lambda c: -c.area)


def _width(comps: Sequence[_Component]) -> int:
    return max(c.x1 for c in comps) - min(c.x0 for c in comps)


def _centre(comps: Sequence[_Component]):
    total = sum(c.area for c in comps)
    return (sum(c.cx * c.area for c in comps) / total, sum(c.cy * c.area for c in comps) / total)


class MapReader:
    """The objects of each class on one label map (and its image, for colours), read once."""

    def __init__(self, label: np.ndarray, calibration: Calibration, class_names: Sequence[str],
                 image: Optional[np.ndarray] = None):
        self.label, self.calibration, self.class_names, self.image = np.asarray(label), calibration, list(class_names), image
        self._cache: Dict[str, List[_Component]] = {}

    def objects(self, cls_name: str) -> List[_Component]:
        if cls_name not in self._cache:
            floor = self.calibration.floor(cls_name, self.label.shape)
            self._cache[cls_name] = _components(self.label == self.class_names.index(cls_name), floor)
        return self._cache[cls_name]

    def count(self, cls_name: str, size: str) -> int:
        comps = self.objects(cls_name)
        if len(comps) != 1:
            return len(comps)
        threshold = self.calibration.pair_threshold(cls_name, size, self.label.shape)
        return 2 if threshold is not None and comps[0].x1 - comps[0].x0 > threshold else 1

    def check(self, fact: Fact) -> Optional[bool]:
        """Whether the fact holds; None when it cannot be checked here (a colour on a map without an image)."""
        if fact.cls not in self.class_names or (fact.other and fact.other not in self.class_names):
            return False
        comps = self.objects(fact.cls)
        if fact.kind == "colour" and self.image is None:
            return None
        if not comps:
            return False
        h, w = self.label.shape
        if fact.kind == "object":
            return True
        if fact.kind == "count":
            return self.count(fact.cls, fact.size) == fact.count
        if fact.kind == "position":
            cx, cy = _centre(comps)
            if fact.where == "bottom":
                return cy > 2 * h / 3
            third = min(2, int(3 * cx / w))
            return ("left", "center", "right")[third] == fact.where
        if fact.kind == "relation":
            others = self.objects(fact.other)
            if not others:
                return False
            (ax, ay), (bx, by) = _centre(comps), _centre(others)
            return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[fact.relation]
        # colour
        mask = self.label == self.class_names.index(fact.cls)
        pixels = np.asarray(self.image, np.float64)[mask]
        median = np.median(pixels, axis=0)
        names = [n for n, _ in fact.colour_choices]
        dists = [np.sum((median - np.asarray(rgb, np.float64)) ** 2) for _, rgb in fact.colour_choices]
        return names[int(np.argmin(dists))] == fact.colour

    def coherence(self, facts: Sequence[Fact], thing_classes: Sequence[str]) -> dict:
        """{"stray_share", "components_per_thing", "unnamed_things"} of this map against its caption."""
        named = {}
        for f in facts:
            if f.kind == "object" and f.cls in thing_classes:
                named[f.cls] = max(named.get(f.cls, 0), f.count)
        thing_pixels = kept = 0
        pieces = 0
        unnamed = False
        for c in thing_classes:
            if c not in self.class_names:
                continue
            mask = self.label == self.class_names.index(c)
            total = int(mask.sum())
            thing_pixels += total
            if c in named:
                every = _components(mask, 1)
                pieces += len(every)
                kept += sum(comp.area for comp in every[:named[c]])
            elif self.objects(c):
                unnamed = True
        return {"stray_share": (thing_pixels - kept) / thing_pixels if thing_pixels else 0.0,
                "components_per_thing": pieces / sum(named.values()) if named else float("nan"),
                "unnamed_things": float(unnamed)}


@dataclasses.dataclass
class Scored:
    """Per-caption results of one variant: `held[i]` maps each checked fact's kind to (held, stated)."""

    held: List[Dict[str, List[int]]] = dataclasses.field(default_factory=list)
    coherence: List[dict] = dataclasses.field(default_factory=list)

    def add(self, reader: MapReader, facts: Sequence[Fact], thing_classes: Sequence[str] = ()) -> List[Optional[bool]]:
        results = [reader.check(f) for f in facts]
        per_kind = {k: [0, 0] for k in KINDS}
        for f, ok in zip(facts, results):
            if ok is not None:
                per_kind[f.kind][0] += int(ok)
                per_kind[f.kind][1] += 1
        self.held.append(per_kind)
        if thing_classes:
            self.coherence.append(reader.coherence(facts, thing_classes))
        return results

    def caption_counts(self) -> np.ndarray:
        """[captions, 2]: facts held and facts checked per caption."""
        return np.array([[sum(v[0] for v in h.values()), sum(v[1] for v in h.values())] for h in self.held], np.int64)

    def summary(self) -> dict:
        """{"facts": pooled share, "captions_all_right", "<kind>": share per kind (absent when none checked),
        "facts_checked", and the coherence means}."""
        counts = self.caption_counts()
        out = {"facts": counts[:, 0].sum() / max(1, counts[:, 1].sum()),
               "captions_all_right": float(np.mean([h == n for h, n in counts if n])) if counts[:, 1].any() else 0.0,
               "facts_checked": int(counts[:, 1].sum())}
        for k in KINDS:
            held = sum(h[k][0] for h in self.held)
            total = sum(h[k][1] for h in self.held)
            if total:
                out[k] = held / total
        if self.coherence:
            for key in self.coherence[0]:
                values = [c[key] for c in self.coherence if not np.isnan(c[key])]
                if values:
                    out[key] = float(np.mean(values))
        return {k: float(v) if k != "facts_checked" else v for k, v in out.items()}


def paired_difference(a: Scored, b: Scored, samples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Pooled fact accuracy of a minus b on the same captions, with a 95% bootstrap interval over captions.

    Both must have scored the same captions in the same order (the variants of one evaluation do: same
    examples, seeds and noise)."""
    ca, cb = a.caption_counts(), b.caption_counts()
    if ca.shape != cb.shape:
        raise ValueError(f"paired difference needs the same captions: {len(ca)} vs {len(cb)}")
    rng = np.random.default_rng(seed)

    def diff(rows):
        return ca[rows, 0].sum() / max(1, ca[rows, 1].sum()) - cb[rows, 0].sum() / max(1, cb[rows, 1].sum())

    everything = np.arange(len(ca))
    draws = np.array([diff(rng.integers(0, len(ca), len(ca))) for _ in range(samples)])
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"difference": float(diff(everything)), "ci_low": float(low), "ci_high": float(high),
            "captions": int(len(ca))}
