"""Pictures: colour-coded label maps, legends and captioned grids (PNG)."""

from __future__ import annotations

import os
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOUR = (0, 0, 0)


def colorize(label: np.ndarray, palette: Sequence, ignore_id: int = 255) -> np.ndarray:
    """Label map [..., H, W] of class ids -> colour image [..., H, W, 3].

    Ignore pixels are black; ids beyond the palette are magenta so they show.
    """
    palette = np.asarray(palette, np.uint8)
    table = np.zeros((256, 3), np.uint8)
    table[:] = (255, 0, 255)
    table[: len(palette)] = palette
    table[ignore_id] = IGNORE_COLOUR
    return table[np.asarray(label, np.uint8)]


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def legend(class_names: Sequence[str], palette: Sequence, present: Optional[Sequence[int]] = None,
           width: int = 120, row: int = 14) -> np.ndarray:
    """A column of colour swatches with class names (only `present` ids if given)."""
    ids = list(range(len(class_names))) if present is None else sorted(set(int(i) for i in present))
    ids = [i for i in ids if 0 <= i < len(class_names)]
    img = Image.new("RGB", (width, max(row, row * len(ids) + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font()
    for k, i in enumerate(ids):
        y = 2 + k * row
        draw.rectangle([2, y, 2 + row - 3, y + row - 3], fill=tuple(int(v) for v in palette[i]), outline=(0, 0, 0))
        draw.text((row + 4, y), class_names[i], fill=(0, 0, 0), font=font)
    return np.asarray(img)


def _text_panel(text: str, width: int, height: int) -> np.ndarray:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    chars = max(8, width // 6)
    draw.multiline_text((3, 3), "\n".join(textwrap.wrap(text, chars)), fill=(0, 0, 0), font=_font(), spacing=2)
    return np.asarray(img)


def _fit(panel: np.ndarray, height: int) -> np.ndarray:
    """Pads (never scales) a panel to `height` rows with white."""
    if panel.shape[0] >= height:
        return panel[:height]
    pad = np.full((height - panel.shape[0],) + panel.shape[1:], 255, panel.dtype)
    return np.concatenate([panel, pad], 0)


def captioned_grid(rows: Sequence[dict], class_names: Sequence[str], palette: Sequence,
                   ignore_id: int = 255, scale: int = 2, caption_width: int = 220) -> np.ndarray:
    """One row per example: caption | one or more images / label maps | legend.

    Each row dict has `caption` and `panels`: a list of arrays, either images
    [H, W, 3] uint8 or label maps [H, W] (colour-coded with the palette).
    """
    rows = [{"caption": r.get("caption", ""), "panels": [(p, None) for p in r["panels"]]} for r in rows]
    return _panel_grid(rows, class_names, palette, ignore_id, scale, caption_width, legend_factor=4)


FACT_HELD, FACT_FAILED, FACT_UNCHECKED = (0, 140, 60), (200, 30, 30), (130, 130, 130)


def facts_panel(facts: Sequence, width: int, height: int, row: int = 13) -> np.ndarray:
    """A caption's facts, one per line: a green tick-box for a fact that holds, a red cross for one that
    does not, grey for one that could not be checked. `facts` is [(text, True | False | None)]."""
    img = Image.new("RGB", (width, max(height, row * len(facts) + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(10)
    for k, (text, ok) in enumerate(facts):
        y = 2 + k * row
        colour = FACT_UNCHECKED if ok is None else FACT_HELD if ok else FACT_FAILED
        box = [2, y + 1, 2 + row - 5, y + row - 4]
        draw.rectangle(box, outline=colour, width=1)
        if ok:
            draw.line([(box[0] + 2, y + 6), (box[0] + 4, box[3] - 2), (box[2] - 1, box[1] + 2)], fill=colour, width=2)
        elif ok is not None:
            draw.line([(box[0] + 2, box[1] + 2), (box[2] - 2, box[3] - 2)], fill=colour, width=2)
            draw.line([(box[0] + 2, box[3] - 2), (box[2] - 2, box[1] + 2)], fill=colour, width=2)
        draw.text((row + 2, y), text, fill=colour if ok is False else (0, 0, 0), font=font)
    return np.asarray(img)


def faithfulness_grid(rows: Sequence[dict], class_names: Sequence[str], palette: Sequence, ignore_id: int = 255,
                      scale: int = 3, caption_width: int = 200, facts_width: int = 170) -> np.ndarray:
    """One row per caption: caption | panels, each a layout map or an image, an image followed by the facts
    that hold in it (ticked) and do not (crossed).

    Each row dict has `caption` and `panels`: [(array, facts or None)], facts as for `facts_panel`.
    """
    return _panel_grid(rows, class_names, palette, ignore_id, scale, caption_width, facts_width, legend_factor=2)


def _panel_grid(rows: Sequence[dict], class_names: Sequence[str], palette: Sequence, ignore_id: int, scale: int,
                caption_width: int, facts_width: int = 170, legend_factor: int = 2) -> np.ndarray:
    """Rows of caption | panels (each followed by its facts, if any) | legend of the classes shown; a legend
    may grow the row to `legend_factor` times its panels' height."""
    out_rows = []
    for r in rows:
        cells, present = [], set()
        for array, facts in r["panels"]:
            p = np.asarray(array)
            if p.ndim == 2:
                present |= set(np.unique(p).tolist()) - {ignore_id}
                p = colorize(p, palette, ignore_id)
            cells.append(np.repeat(np.repeat(p, scale, 0), scale, 1))
            if facts is not None:
                cells.append(facts_panel(facts, facts_width, cells[-1].shape[0]))
            cells.append(np.full((cells[-1].shape[0], 4, 3), 255, np.uint8))
        height = max(c.shape[0] for c in cells)
        leg = legend(class_names, palette, present or None)
        height = max(height, min(leg.shape[0], legend_factor * height))
        cells = [_text_panel(r.get("caption", ""), caption_width, height)] + cells + [leg]
        out_rows.append(np.concatenate([_fit(c, height) for c in cells], 1))
        out_rows.append(np.full((4, out_rows[-1].shape[1], 3), 200, np.uint8))
    width = max(r.shape[1] for r in out_rows)
    out_rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in out_rows]
    return np.concatenate(out_rows, 0)


def save_png(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


# Series colours of bar charts (colour-blind-safe Okabe-Ito order).
SERIES_COLOURS = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0))


def bar_chart(categories: Sequence[str], series: dict, title: str = "", width: int = 520,
              bar: int = 7, value_range: tuple = (0.0, 1.0)) -> np.ndarray:
    """Horizontal grouped bars: one group per category, one bar per series ({name: values}).

    Values outside `value_range` are clipped; None / NaN draw no bar and an
    "n/a" mark, so a class absent from a split is not mistaken for an IoU of 0.
    """
    names = list(series)
    label_w, pad, top = 90, 4, 18 + 14 * ((len(names) + 2) // 3)
    group = bar * len(names) + 6
    axis = 14  # value labels under the bars
    height = top + group * len(categories) + pad + axis
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    for k, name in enumerate(names):  # legend, three series per line
        x, y = pad + (k % 3) * (width // 3), 16 + 14 * (k // 3)
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=SERIES_COLOURS[k % len(SERIES_COLOURS)])
        draw.text((x + 13, y), name, fill=(0, 0, 0), font=font)
    low, high = value_range
    span = width - label_w - 40
    for i, cat in enumerate(categories):
        y0 = top + i * group
        draw.text((pad, y0 + max(0, group // 2 - 8)), cat, fill=(0, 0, 0), font=font)
        for k, name in enumerate(names):
            v = series[name][i]
            y = y0 + k * bar
            if v is None or (isinstance(v, float) and np.isnan(v)):
                draw.text((label_w, y - 3), "n/a", fill=(120, 120, 120), font=_font(9))
                continue
            frac = (min(max(float(v), low), high) - low) / max(high - low, 1e-12)
            draw.rectangle([label_w, y, label_w + int(frac * span), y + bar - 2],
                           fill=SERIES_COLOURS[k % len(SERIES_COLOURS)])
        draw.line([label_w, y0 + group - 3, width - 40, y0 + group - 3], fill=(230, 230, 230))
    bottom = height - pad - axis
    draw.line([label_w, top, label_w, bottom], fill=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        x = label_w + int(frac * span)
        draw.line([x, bottom, x, bottom + 3], fill=(0, 0, 0))
        draw.text((x - 8, bottom + 3), f"{low + frac * (high - low):g}", fill=(0, 0, 0), font=_font(9))
    return np.asarray(img)
