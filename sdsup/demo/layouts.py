"""Layouts on the demo page: class ids to and from the browser, uploads, photos, and how well an image follows one.

A layout is a uint8 [size, size] map of class ids (the dataset's classes, or
its ignore id for "no class here"), the same array `sdsup.sample --layout`
reads. The page paints ids directly; everything it sends back is checked
here. Uploaded files go through `sdsup.inference.load_layout`, the reader of
`sdsup.sample`, so an upload the page accepts is a file the command accepts.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
import tempfile
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdsup import inference, segmentation, viz
from sdsup.data import pipeline, registry
from sdsup.errors import SdsupError

LAYOUT_EXTENSIONS = (".png", ".npy")
# Largest upload the page accepts (a layout or a photo), in bytes.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024


class DemoError(SdsupError):
    """Input from the page that cannot be used; the message is shown to the user as one line."""


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def class_table(spec: registry.DatasetSpec) -> List[dict]:
    """The page's class picker and legend: [{id, name, colour}] per class, then the ignore id ("no class")."""
    rows = [{"id": i, "name": name, "colour": hex_colour(colour)}
            for i, (name, colour) in enumerate(zip(spec.class_names, spec.palette))]
    rows.append({"id": int(spec.ignore_id), "name": "ignore (no class)", "colour": hex_colour(viz.IGNORE_COLOUR)})
    return rows


def encode_ids(ids: np.ndarray) -> str:
    """A layout for the page: its bytes, row-major, base64."""
    return base64.b64encode(np.ascontiguousarray(ids, np.uint8).tobytes()).decode("ascii")


def decode_ids(text: str, size: int, spec: registry.DatasetSpec) -> np.ndarray:
    """The page's layout (base64 of size*size class ids) -> uint8 [size, size], checked like `load_layout`."""
    try:
        raw = base64.b64decode(text or "", validate=True)
    except (ValueError, TypeError):
        raise DemoError("the layout sent by the page is not base64; reload the page") from None
    if len(raw) != size * size:
        raise DemoError(f"the layout sent by the page has {len(raw)} pixels; this model needs {size}x{size} = "
                        f"{size * size}; reload the page")
    ids = np.frombuffer(raw, np.uint8).reshape(size, size).copy()
    check_ids(ids, spec, "the layout")
    return ids


def check_ids(ids: np.ndarray, spec: registry.DatasetSpec, what: str) -> None:
    bad = sorted(set(np.unique(ids).tolist()) - set(range(spec.num_classes)) - {spec.ignore_id})
    if bad:
        raise DemoError(f"{what} has ids {bad[:10]} outside the {spec.num_classes} classes "
                        f"(0..{spec.num_classes - 1}, ignore {spec.ignore_id})")


def check_labelled(ids: np.ndarray, spec: registry.DatasetSpec) -> None:
    """An image needs a layout with at least one class: an all-ignore map says nothing to the conditioner."""
    if (ids == spec.ignore_id).all():
        raise DemoError("the layout is empty (every pixel is ignore): generate one from the prompt, paint "
                        "classes or upload a layout first")


def palette_image(ids: np.ndarray, spec: registry.DatasetSpec) -> np.ndarray:
    """uint8 [H, W, 3]: the layout in the dataset's colours at its own size (ignore black), a PNG that
    `sdsup.sample --layout` and the page's upload read back to the same ids."""
    return viz.colorize(ids, spec.palette, spec.ignore_id)


def resize_nearest(array: np.ndarray, size: int) -> np.ndarray:
    """[H, W, ...] -> [size, size, ...] by nearest neighbour (ids and palette colours stay exact)."""
    h, w = array.shape[:2]
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    return array[rows][:, cols]


def snap_to_palette(rgb: np.ndarray, spec: registry.DatasetSpec) -> Tuple[np.ndarray, int]:
    """Each colour -> the nearest palette colour (or the ignore black); returns (image, pixels changed).

    For layouts painted in an editor whose brush blends colours at stroke edges.
    """
    choices = np.concatenate([spec.palette_array, np.asarray([viz.IGNORE_COLOUR], np.uint8)]).astype(np.int64)
    flat = rgb.reshape(-1, 3).astype(np.int64)
    nearest = np.argmin(((flat[:, None, :] - choices[None]) ** 2).sum(-1), 1)
    snapped = choices[nearest].astype(np.uint8).reshape(rgb.shape)
    return snapped, int((snapped != rgb).any(-1).sum())


def _upload_name(filename: str) -> str:
    """The uploaded file's own name, reduced to safe characters (it names a temporary file and appears in
    messages)."""
    base = os.path.basename((filename or "").replace("\\", "/")) or "upload"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:100]


@dataclasses.dataclass
class Upload:
    """A layout or photo read from the page: the ids (or image) and notes for the user about what was done."""

    array: np.ndarray
    notes: List[str]


def read_layout_upload(filename: str, data: bytes, spec: registry.DatasetSpec, size: int,
                       snap: bool = False) -> Upload:
    """An uploaded layout file (.png of palette colours or ids, .npy of ids) -> uint8 [size, size] ids.

    A map of another size is resized by nearest neighbour (with a note); with
    `snap`, colours outside the palette become the nearest palette colour (with
    a note), otherwise they are an error naming the first one. The decoding
    and checks are `sdsup.inference.load_layout`'s.
    """
    name = _upload_name(filename)
    ext = os.path.splitext(name)[1].lower()
    if ext not in LAYOUT_EXTENSIONS:
        raise DemoError(f"layout {name}: expected a .png (palette colours or class ids) or .npy (class ids) file")
    _check_upload_size(name, data)
    notes = []
    try:
        if ext == ".npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if array.ndim == 3 and array.shape[0] == 1:
                array = array[0]
            if array.ndim == 2 and array.shape != (size, size):
                notes.append(f"{name} is {array.shape[0]}x{array.shape[1]}: resized to {size}x{size} "
                             "(nearest neighbour)")
                array = resize_nearest(array, size)
        else:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.size != (size, size):
                    notes.append(f"{name} is {img.size[1]}x{img.size[0]}: resized to {size}x{size} "
                                 "(nearest neighbour)")
                    img = img.resize((size, size), Image.Resampling.NEAREST)
                if snap and img.mode in ("RGB", "RGBA"):
                    snapped, changed = snap_to_palette(np.asarray(img.convert("RGB")), spec)
                    if changed:
                        notes.append(f"{changed} pixels of {name} were not palette colours: snapped to the "
                                     "nearest class colour")
                    img = Image.fromarray(snapped)
                array = img
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
        raise DemoError(f"cannot read layout {name}: {type(e).__name__}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="sdsup-demo-upload-") as folder:
        path = os.path.join(folder, name)
        if ext == ".npy":
            np.save(path, array, allow_pickle=False)
        else:
            array.save(path, format="PNG")
        try:
            ids = inference.load_layout(path, spec, size)
        except inference.InferenceError as e:
            message = str(e).replace(folder + os.sep, "")
            if "palette" in message:
                message += " (tick 'snap colours' to map each colour to the nearest class)"
            raise DemoError(message) from None
    return Upload(ids, notes)


def read_photo(filename: str, data: bytes, geometry: pipeline.Geometry) -> Upload:
    """An uploaded photo -> uint8 [size, size, 3], resized and centre-cropped as the dataset's images are for
    evaluation (`data.resize`, `data.resize_mode`), so the evaluation segmenter sees what it was trained on."""
    name = _upload_name(filename)
    _check_upload_size(name, data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            image = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
        raise DemoError(f"cannot read photo {name}: {type(e).__name__}: {e}") from None
    notes = []
    if image.shape[:2] != (geometry.size, geometry.size):
        h, w = geometry.target
        how = "stretched" if geometry.mode == "stretch" else "shorter side scaled"
        notes.append(f"photo {name} ({image.shape[0]}x{image.shape[1]}) {how} to {h}x{w} (Lanczos) and "
                     f"centre-cropped to {geometry.size}x{geometry.size}, as the dataset's images are")
    dummy_label = np.zeros(image.shape[:2], np.uint8)  # Geometry resizes an image with its label map
    image, _ = geometry.apply(image, dummy_label, rng=None)
    return Upload(np.ascontiguousarray(image), notes)


def _check_upload_size(name: str, data: bytes) -> None:
    if not data:
        raise DemoError(f"{name} is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise DemoError(f"{name} is {len(data) / 2 ** 20:.1f} MiB; the page takes files up to "
                        f"{MAX_UPLOAD_BYTES // 2 ** 20} MiB")


def agreement(reading: np.ndarray, layout: np.ndarray, spec: registry.DatasetSpec) -> dict:
    """How well an image follows its layout, from the evaluation segmenter's reading of it.

    {"miou": mIoU over the classes in the layout (the evaluation's image mIoU for one image; None for an
    empty layout), "pixel_accuracy", "per_class_iou": {class: IoU} for the classes in the layout or the
    reading}.
    """
    confusion = segmentation.confusion_matrix(reading, layout, spec.num_classes, spec.ignore_id)
    miou, iou = segmentation.iou_from_confusion(confusion)
    labelled = confusion.sum()
    return {"miou": None if np.isnan(miou) else float(miou),
            "pixel_accuracy": float(np.trace(confusion) / labelled) if labelled else None,
            "per_class_iou": {spec.class_names[i]: float(v) for i, v in enumerate(iou) if not np.isnan(v)}}


def classes_present(ids: np.ndarray, spec: registry.DatasetSpec) -> List[str]:
    """Names of the classes a layout holds, most pixels first."""
    counts = np.bincount(ids.reshape(-1), minlength=256)[:spec.num_classes]
    return [spec.class_names[i] for i in np.argsort(-counts, kind="stable") if counts[i]]


def optional_ids(text: Optional[str], size: int, spec: registry.DatasetSpec) -> Optional[np.ndarray]:
    return None if text is None else decode_ids(text, size, spec)
