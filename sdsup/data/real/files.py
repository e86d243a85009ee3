"""The user's files, as a folder or as the zip it came in: found, listed and read the same way.

Datasets ship as zips (`ADEChallengeData2016.zip`, `train2017.zip`, ...) that users often extract.
A `Tree` is either form: `locate` looks for the extracted folder first (faster to read), then the
zip, and says what it expected and what it found when neither is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from typing import Dict, List, Optional, Sequence

from sdsup.data.registry import DatasetError


@dataclasses.dataclass(frozen=True)
class Ref:
    """One file: `member` of the zip at `path`, or the plain file `path` (member None)."""

    path: str  # the file, or the zip holding it
    member: Optional[str] = None  # the zip member, None for a plain file

    def __str__(self) -> str:  # how messages name the file
        return f"{self.path}:{self.member}" if self.member is not None else self.path


def _hidden(name: str) -> bool:
    # Finder's `__MACOSX/` and `._x` entries, and dot files, are never data.
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class Tree:
    """A folder, or the members of a zip under `prefix`; paths inside are '/'-separated."""

    def __init__(self, root: str, *, zip_path: Optional[str] = None, prefix: str = "", names=None):
        self.root = root  # the folder, or the zip
        self.zip_path = zip_path
        self.prefix = prefix
        self._names = names  # the zip's member names (files only), listed once
        self._name_set = frozenset(names or ())

    @classmethod
    def folder(cls, path: str) -> "Tree":
        return cls(path)

    @classmethod
    def zip(cls, path: str) -> "Tree":
        try:
            with zipfile.ZipFile(path) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir() and not _hidden(i.filename)]
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{path} is not a readable zip file ({type(e).__name__}: {e}); "
                               f"download it again or extract it next to it") from None
        return cls(path, zip_path=path, names=names)

    @property
    def is_zip(self) -> bool:
        return self.zip_path is not None

    def with_prefix(self, prefix: str) -> "Tree":
        return Tree(self.root, zip_path=self.zip_path, prefix=prefix, names=self._names)

    def __str__(self) -> str:
        return f"{self.zip_path} ({self.prefix or 'top level'})" if self.is_zip else self.root

    def has_dir(self, sub: str) -> bool:
        """Whether `sub` exists as a folder (in a zip: some file lies under it)."""
        if not self.is_zip:
            return os.path.isdir(os.path.join(self.root, sub))
        start = self.prefix + sub.strip("/") + "/" if sub.strip("/") else self.prefix
        return any(n.startswith(start) for n in self._names)

    def has_file(self, rel: str) -> bool:
        if not self.is_zip:
            return os.path.isfile(os.path.join(self.root, rel))
        return (self.prefix + rel) in self._name_set

    def files(self, sub: str = "") -> List[str]:
        """Every file under `sub` (recursively), as paths relative to `sub`, sorted; hidden files left out."""
        sub = sub.strip("/")
        if self.is_zip:
            start = self.prefix + sub + "/" if sub else self.prefix
            return sorted(n[len(start):] for n in self._names if n.startswith(start))
        base = os.path.join(self.root, sub)
        found = []
        for folder, dirs, names in os.walk(base):
            dirs[:] = [d for d in dirs if not _hidden(d)]
            rel = os.path.relpath(folder, base)
            for name in names:
                if not _hidden(name):
                    found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
        return sorted(found)

    def ref(self, rel: str) -> Ref:
        """The file at `rel` (relative to the tree's root or prefix)."""
        if self.is_zip:
            return Ref(self.zip_path, self.prefix + rel)
        return Ref(os.path.join(self.root, *rel.split("/")))


class Reader:
    """Reads `Ref`s, keeping each zip open while it is in use (`with Reader() as r: r.read(ref)`)."""

    def __init__(self):
        self._zips: Dict[str, zipfile.ZipFile] = {}

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        for zf in self._zips.values():
            zf.close()
        self._zips.clear()

    def read(self, ref: Ref) -> bytes:
        try:
            if ref.member is None:
                with open(ref.path, "rb") as f:
                    return f.read()
            if ref.path not in self._zips:
                self._zips[ref.path] = zipfile.ZipFile(ref.path)
            return self._zips[ref.path].read(ref.member)
        except (OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise DatasetError(f"cannot read {ref}: {type(e).__name__}: {e}") from None


def locate(path: str, *, dataset: str, what: str, zip_name: str, required: Sequence[str],
           folders: Sequence[str] = (".",), zip_prefixes: Sequence[str] = ("",)) -> Tree:
    """The `what` of `dataset` under `path`: the first of `folders` (relative to `path`) that holds every
    `required` sub-folder, else the zip `zip_name` whose members lie under one of `zip_prefixes` + each
    `required`. DatasetError naming both layouts and what `path` holds when neither is there."""
    for folder in folders:
        root = os.path.normpath(os.path.join(path, folder))
        if all(os.path.isdir(os.path.join(root, r)) for r in required):
            return Tree.folder(root)
    zip_path = os.path.join(path, zip_name)
    extracted = " or ".join("data.path itself" if f == "." else f"data.path/{f}" for f in folders)
    layout = (f"the zip {zip_name}, or its extracted folder: {extracted} holding "
              + ", ".join(f"{r}/" for r in required))
    if os.path.isfile(zip_path):
        try:
            tree = Tree.zip(zip_path)
        except DatasetError as e:
            raise DatasetError(f"dataset {dataset}: {e}") from None
        for prefix in zip_prefixes:
            candidate = tree.with_prefix(prefix)
            if all(candidate.has_dir(r) for r in required):
                return candidate
        raise DatasetError(
            f"dataset {dataset}: {zip_path} does not hold the {what} (expected members under "
            + " or ".join(f"{p or '(top level)'}" for p in zip_prefixes) + " named "
            + ", ".join(f"{r}/..." for r in required) + f"); its first members: {tree.files()[:5]}")
    raise DatasetError(f"dataset {dataset}: cannot find the {what} in data.path={path}: expected {layout}; "
                       f"data.path holds {listing(path)}")


def listing(path: str, limit: int = 12) -> str:
    """What the folder `path` holds, for messages: its first entries (folders with a /)."""
    if not os.path.isdir(path):
        return "nothing (it does not exist)" if not os.path.exists(path) else "nothing (it is not a folder)"
    names = sorted(n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in os.listdir(path))
    if not names:
        return "nothing (it is empty)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a (small) file's content, for build names."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
