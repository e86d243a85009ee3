"""The `python -m sdsup.sample ...` commands that reproduce what the demo page made, exactly.

The page generates through the same `sdsup.inference.Session` calls as
`sdsup.sample`, with every sampler setting written out (not left to the
config's defaults), so pasting the command into a shell gives the same
files: images from a layout file (`--layout`, the map the page sent, saved
next to the images) and, for a layout the layout model drew, the layout itself
(`--layout_only`).
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Optional

PROGRAM = ("python", "-m", "sdsup.sample")


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """What the image sampler was asked for: `sdsup.sample`'s flags of the same names."""

    prompt: str
    seed: int
    num_samples: int
    steps: int
    guidance: float
    solver: str


@dataclasses.dataclass(frozen=True)
class LayoutRequest:
    """What the text -> layout sampler was asked for: `sdsup.sample`'s --layout_* flags, --seed and --prompt."""

    prompt: str
    seed: int
    mode: str  # "sample" or "map"
    steps: int
    temperature: float
    guidance: float


def _render(flags: list) -> str:
    return " ".join(PROGRAM + tuple(f"--{name}={shlex.quote(str(value))}" if value is not True else f"--{name}"
                                    for name, value in flags))


def _number(value: float) -> str:
    """A float flag as Python prints it (repr round-trips, so the command gives the same float)."""
    return repr(float(value))


def images_command(workdir: str, out: str, request: ImageRequest, layout_file: Optional[str]) -> str:
    """The command that makes the same images: from `layout_file` (a .npy of ids) through the conditioner, or
    from the text alone when `layout_file` is None (a workdir without a conditioner)."""
    flags = [("workdir", workdir), ("prompt", request.prompt)]
    if layout_file is not None:
        flags.append(("layout", layout_file))
    flags += [("seed", int(request.seed)), ("num_samples", int(request.num_samples)), ("steps", int(request.steps)),
              ("guidance", _number(request.guidance)), ("solver", request.solver), ("out", out)]
    return _render(flags)


def layout_command(workdir: str, out: str, request: LayoutRequest) -> str:
    """The command that draws the same layout from the prompt: OUT/layout_0.npy equals the page's map."""
    flags = [("workdir", workdir), ("prompt", request.prompt), ("layout_only", True), ("seed", int(request.seed)),
             ("layout_mode", request.mode)]
    if request.mode == "sample":  # the most probable map is one pass without draws: no steps, no temperature
        flags += [("layout_steps", int(request.steps)), ("layout_temperature", _number(request.temperature))]
    flags += [("layout_guidance", _number(request.guidance)), ("out", out)]
    return _render(flags)


def parse_flags(command: str) -> dict:
    """{flag: value} of a command made here (values as strings; a bare flag is True): for tests and tools that
    check a command."""
    words = shlex.split(command)
    if tuple(words[:3]) != PROGRAM:
        raise ValueError(f"not an sdsup.sample command: {command[:60]!r}")
    out = {}
    for word in words[3:]:
        name, sep, value = word[2:].partition("=")
        out[name] = value if sep else True
    return out
