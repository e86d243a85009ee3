"""Captions for the real datasets: ALDM-format JSON files and COCO's caption annotations.

`data.captions` names one JSON file or several, comma-separated, each `{stem: "caption"}` or
`{stem: ["caption", ...]}` -- the format ALDM published (`ade20k_caption_train.json`,
`cityscapes_caption_val.json`, ...) and `python -m sdsup.caption` writes. Files are merged: a stem
in several files gets the captions of all of them, in file order, each text once. Stems no image
has are ignored (a file may cover several splits or a larger dataset). Captions are stripped of
surrounding whitespace.

`data.missing_captions`: "error" (default) stops a build whose images lack a caption, naming how
many and the first few; "empty" gives them the caption "".
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Sequence, Tuple

from sdsup.data.registry import DatasetError

MISSING_MODES = ("error", "empty")
Captions = Tuple[str, ...]


def caption_paths(data_config) -> Tuple[str, ...]:
    """The files `data.captions` names (absolute; () when unset); DatasetError for one that does not exist."""
    value = data_config.get("captions") if hasattr(data_config, "get") else None
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    paths = tuple(os.path.abspath(os.path.expanduser(str(p).strip())) for p in items if str(p).strip())
    for path in paths:
        if not os.path.isfile(path):
            raise DatasetError(f"data.captions: caption file {path} does not exist")
    return paths


def missing_mode(data_config) -> str:
    mode = data_config.get("missing_captions", "error") if hasattr(data_config, "get") else "error"
    mode = mode or "error"
    if mode not in MISSING_MODES:
        raise DatasetError(f"data.missing_captions must be one of {MISSING_MODES}, got {mode!r}")
    return mode


def read_caption_files(paths: Sequence[str]) -> Dict[str, Captions]:
    """{stem: captions} merged over `paths` (see the module docstring)."""
    merged: Dict[str, List[str]] = {}
    for path in paths:
        for stem, captions in _read_caption_file(path).items():
            have = merged.setdefault(stem, [])
            have.extend(c for c in captions if c not in have)
    return {stem: tuple(captions) for stem, captions in merged.items()}


def _read_caption_file(path: str) -> Dict[str, Captions]:
    data = _load_json(path, "caption file")
    if not isinstance(data, dict):
        raise DatasetError(f"caption file {path} holds a JSON {_json_type(data)}; expected an object "
                           f"{{stem: caption}} or {{stem: [captions]}}")
    table = {}
    for stem, value in data.items():
        if isinstance(value, str):
            captions = (value.strip(),)
        elif isinstance(value, list) and value and all(isinstance(c, str) for c in value):
            captions = tuple(c.strip() for c in value)
        else:
            raise DatasetError(f"caption file {path}: the value of key {stem!r} is {_kind(value)}; expected a "
                               f"caption string or a non-empty list of caption strings")
        table[stem] = captions
    return table


def read_coco_captions(data: bytes, where: str) -> Dict[str, Captions]:
    """{stem: captions} from a COCO caption annotation file (`captions_train2017.json`): the image's file stem
    (from "images", else the 12-digit id), captions in annotation id order."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"COCO caption file {where} is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise DatasetError(f"COCO caption file {where} is not a COCO caption annotation file "
                           f"(expected an object with an \"annotations\" list)")
    stems = {}
    for i, image in enumerate(doc.get("images") or []):
        if not (isinstance(image, dict) and isinstance(image.get("id"), int)
                and isinstance(image.get("file_name"), str)):
            raise DatasetError(f"COCO caption file {where}: images[{i}] is not {{\"id\": int, \"file_name\": str}}")
        stems[image["id"]] = os.path.splitext(os.path.basename(image["file_name"]))[0]
    entries = []
    for i, ann in enumerate(doc["annotations"]):
        if not (isinstance(ann, dict) and isinstance(ann.get("image_id"), int)
                and isinstance(ann.get("caption"), str)):
            raise DatasetError(f"COCO caption file {where}: annotations[{i}] is not "
                               f"{{\"image_id\": int, \"caption\": str}}")
        entries.append((ann.get("id", i) if isinstance(ann.get("id"), int) else i, ann["image_id"], ann["caption"]))
    table: Dict[str, List[str]] = {}
    for _, image_id, caption in sorted(entries, key=lambda e: e[0]):
        have = table.setdefault(stems.get(image_id, f"{image_id:012d}"), [])
        if caption.strip() not in have:
            have.append(caption.strip())
    return {stem: tuple(captions) for stem, captions in table.items()}


def attach(split_stems: Mapping[str, Sequence[str]], table: Mapping[str, Captions], *, mode: str, dataset: str,
           source: str) -> Dict[str, List[Captions]]:
    """Each split's captions, stem by stem; DatasetError (`mode` "error") naming the images that have none
    in `source` (how the message names where captions come from)."""
    missing = {split: [s for s in stems if s not in table] for split, stems in split_stems.items()}
    total = sum(len(m) for m in missing.values())
    if total and mode == "error":
        counts = ", ".join(f"{split}: {len(m)}" for split, m in missing.items() if m)
        first = [s for m in missing.values() for s in m][:5]
        raise DatasetError(f"dataset {dataset}: {total} images have no caption in {source} ({counts}); first: "
                           f"{', '.join(first)}. Add them, or set data.missing_captions='empty' to train them "
                           f"with an empty caption")
    return {split: [table.get(s, ("",)) for s in stems] for split, stems in split_stems.items()}


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{what} {path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise DatasetError(f"cannot read {what} {path}: {e}") from None


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _kind(value) -> str:
    """A caption value that is not a string or a list of strings, as messages describe it."""
    if isinstance(value, list):
        return "an empty list" if not value else "a list holding a non-string"
    kind = _json_type(value)
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind
