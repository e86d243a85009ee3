"""What `import` and `export` share: their error, the files of an imported directory, JSON, staging.

Both commands build everything in a staging directory next to OUT and move it
into place only when every component converted, so a failure never leaves a
half-written OUT and nothing that was in OUT before is deleted (an existing,
non-empty OUT is refused unless `overwrite=True`, which replaces only the
entries this command writes).

Errors the user can fix raise `PipelineConvertError` (an `SdsupError`) with a
one-line message naming the file or component.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

from sdsup.errors import SdsupError

# An imported directory: OUT/manifest.json lists the converted components (sdsup model dirs) and the copied ones.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sdsup-import"
# An exported directory: OUT/sdsup_export.json summarises the export.
EXPORT_INFO = "sdsup_export.json"
FORMAT_VERSION = 1

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "controlnet")
COPIED_COMPONENTS = ("tokenizer", "scheduler")


class PipelineConvertError(SdsupError):
    """A missing, unreadable or unsupported input, or an output that cannot be written."""


Log = Callable[[str], None]


def quiet(_: str) -> None:
    """A `Log` that drops every message."""


def read_json(path: str, what: str) -> Any:
    """The parsed JSON file at `path`; PipelineConvertError naming `what` if it is missing or unreadable."""
    if not os.path.isfile(path):
        raise PipelineConvertError(f"{what}: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineConvertError(f"{what}: {path} is unreadable: {type(e).__name__}: {one_line(e)}") from e


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON with sorted keys and a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def one_line(e: BaseException) -> str:
    """An exception's message on one line, cut at 600 characters (for one-line CLI errors)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 600 else text[:600] + " ..."


def same_or_nested(a: str, b: str) -> bool:
    """Whether directories `a` and `b` are the same or one contains the other."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


class Staging:
    """A temporary directory next to `out`, moved into `out` by `commit` (entry by entry)."""

    def __init__(self, out: str, overwrite: bool):
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise PipelineConvertError(f"--out {out} exists and is not a directory")
        if os.path.isdir(self.out) and os.listdir(self.out) and not overwrite:
            raise PipelineConvertError(
                f"--out {out} exists and is not empty; choose a new directory or pass --overwrite "
                "(which replaces only the entries this command writes)")
        parent = os.path.dirname(self.out)
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.staging-", dir=parent)
        except OSError as e:
            raise PipelineConvertError(f"cannot create a staging directory next to {out}: {one_line(e)}") from e

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        """Moves every staged entry into `out`; an entry of the same name there is replaced."""
        if not os.path.isdir(self.out):
            os.replace(self.path, self.out)
            return
        for name in sorted(os.listdir(self.path)):
            src, dst = os.path.join(self.path, name), os.path.join(self.out, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=self.out)
                os.replace(dst, os.path.join(old, name))
                os.replace(src, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(src, dst)
