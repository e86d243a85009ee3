"""The `folder` dataset's class file: DIR/classes.txt or DIR/classes.json.

The registry reads it for the `folder` spec, so this module imports neither TensorFlow nor the registry;
its `ClassFileError` becomes a `registry.DatasetError` where it is read (`registry`, `folder`).

classes.txt   one class name per line; class ids are the line order. Blank lines and lines whose
              first non-blank character is `#` are skipped. Names are stripped of surrounding
              whitespace and must be unique.
classes.json  {"names": [...], "colors": [[r, g, b], ...] (optional), "ignore_id": 255 (optional)};
              no other keys.

`ignore_id` is the value that marks unlabelled pixels in YOUR label PNGs (default 255); it must not
be a class id (>= the number of classes). Records store those pixels as 255 like every dataset, so
the spec's ignore id is always 255. At most 255 classes (ids 0..254). Without colours the classes
get `classes.generated_palette`, a fixed deterministic palette.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Tuple

from sdsup.data.real import classes as class_tables

TXT, JSON = "classes.txt", "classes.json"
MAX_CLASSES = 255  # ids 0..254; 255 is the records' ignore id
_JSON_KEYS = ("names", "colors", "ignore_id")


class ClassFileError(ValueError):
    """A class file that is missing or malformed; the message names the file (and line or key)."""


@dataclasses.dataclass(frozen=True)
class ClassFile:
    path: str
    names: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    ignore_id: int  # the value of unlabelled pixels in the user's label PNGs
    sha256: str  # of the file's bytes, part of the build's name


def find(root: str) -> str:
    """The class file of the dataset at `root`; ClassFileError when there is none or there are two."""
    if not os.path.isdir(root):
        raise ClassFileError(f"dataset folder: data.path={root} is not a folder (it should hold images/, labels/ "
                             f"and {TXT} or {JSON})")
    present = [name for name in (TXT, JSON) if os.path.isfile(os.path.join(root, name))]
    if len(present) == 2:
        raise ClassFileError(f"dataset folder: {root} has both {TXT} and {JSON}; keep one")
    if not present:
        raise ClassFileError(f"dataset folder: {root} has no class file: expected {root}/{TXT} (one class name per "
                           f"line) or {root}/{JSON} ({{\"names\": [...], \"colors\": [...], \"ignore_id\": 255}})")
    return os.path.join(root, present[0])


def read(root: str) -> ClassFile:
    """The classes of the dataset at `root`; ClassFileError naming the file (and line or key) when malformed."""
    path = find(root)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClassFileError(f"class file {path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ClassFileError(f"cannot read class file {path}: {e}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if path.endswith(".txt"):
        names, colours, ignore_id = _parse_txt(path, text), None, class_tables.IGNORE_ID
    else:
        names, colours, ignore_id = _parse_json(path, text)
    if not names:
        raise ClassFileError(f"class file {path} names no classes")
    if len(names) > MAX_CLASSES:
        raise ClassFileError(f"class file {path} names {len(names)} classes; at most {MAX_CLASSES} fit the 8-bit "
                           f"label maps (255 is the ignore id)")
    if ignore_id < len(names):
        raise ClassFileError(f"class file {path}: ignore_id {ignore_id} is a class id (0..{len(names) - 1}); "
                           f"it must be at least {len(names)}")
    palette = tuple(colours) if colours is not None else class_tables.generated_palette(len(names))
    return ClassFile(path, tuple(names), palette, ignore_id, digest)


def listed_lines(text: str):
    """(line number, entry) of a one-entry-per-line file: entries stripped, blank lines and `#` comments skipped."""
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield number, entry


def _parse_txt(path: str, text: str):
    names, first_line = [], {}
    for number, name in listed_lines(text):
        if name in first_line:
            raise ClassFileError(f"class file {path}, line {number}: class {name!r} is already on line "
                               f"{first_line[name]}")
        first_line[name] = number
        names.append(name)
    return names


def _parse_json(path: str, text: str):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClassFileError(f"class file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") \
            from None
    if not isinstance(doc, dict):
        raise ClassFileError(f"class file {path} must hold a JSON object {{\"names\": [...], ...}}")
    unknown = sorted(set(doc) - set(_JSON_KEYS))
    if unknown:
        raise ClassFileError(f"class file {path}: unknown keys {unknown}; the keys are {list(_JSON_KEYS)}")
    names = doc.get("names")
    if not isinstance(names, list):
        raise ClassFileError(f"class file {path}: \"names\" must be a list of class names")
    seen = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ClassFileError(f"class file {path}: names[{i}] is {name!r}; expected a non-empty string")
        if name.strip() in seen:
            raise ClassFileError(f"class file {path}: names[{i}] {name!r} repeats names[{seen[name.strip()]}]")
        seen[name.strip()] = i
    colours: Optional[list] = None
    if doc.get("colors") is not None:
        colours = doc["colors"]
        if not isinstance(colours, list) or len(colours) != len(names):
            raise ClassFileError(f"class file {path}: \"colors\" must be a list of {len(names)} [r, g, b] colours, "
                               f"one per name")
        for i, c in enumerate(colours):
            if not (isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                and 0 <= v <= 255 for v in c)):
                raise ClassFileError(f"class file {path}: colors[{i}] is {c!r}; expected [r, g, b] with each 0..255")
        colours = [tuple(c) for c in colours]
    ignore_id = doc.get("ignore_id", class_tables.IGNORE_ID)
    if not isinstance(ignore_id, int) or isinstance(ignore_id, bool) or not 0 <= ignore_id <= 65535:
        raise ClassFileError(f"class file {path}: ignore_id is {ignore_id!r}; expected an integer 0..65535")
    return [n.strip() for n in names], colours, ignore_id
