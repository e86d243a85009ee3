"""Training stages, run in the order a config lists them.

A stage is a function `run(ctx: Context) -> dict` registered under a name. It
leaves its outputs under `ctx.stage_dir(name)`; when it returns, a DONE.json
with its summary marks it finished, so re-running a config skips it. A stage
that was interrupted has no DONE.json and runs again (resuming from its own
checkpoints, where it has them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

import jax
from absl import logging
from jax.experimental import multihost_utils

_STAGES: dict = {}


@dataclasses.dataclass
class Context:
    config: object  # ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    cache: dict = dataclasses.field(default_factory=dict)  # shared between stages of one run

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(path, exist_ok=True)
        return path


def register(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        if name in _STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        _STAGES[name] = fn
        return fn
    return wrap


def names() -> list:
    _load()
    return list(_STAGES)


def _load() -> None:
    from sdsup.stages import control, data, discriminator, evalseg, layout, ldm, vae  # noqa: F401  (each module registers its stage)
    from sdsup.evaluation import suite  # noqa: F401  (stage "evaluate")


def done_marker(workdir: str, name: str) -> str:
    return os.path.join(workdir, name, "DONE.json")


def run_all(ctx: Context, only: Optional[list] = None) -> dict:
    """Runs the config's stages in order, skipping finished ones."""
    _load()
    summaries = {}
    for name in ctx.config.stages:
        if only and name not in only:
            continue
        marker = done_marker(ctx.workdir, name)
        if os.path.exists(marker):
            logging.info("stage %s: finished earlier (%s), skipping", name, marker)
            with open(marker) as f:
                summaries[name] = json.load(f)
            continue
        logging.info("stage %s: starting", name)
        start = time.time()
        ctx.cache.pop("compile_s", None)
        summary = dict(_STAGES[name](ctx) or {})
        summary["seconds"] = round(time.time() - start, 2)
        if "compile_s" in ctx.cache:  # the train step's ahead-of-time compile (sdsup.stages.common.compile_step)
            summary["compile_s"] = round(ctx.cache.pop("compile_s"), 2)
        multihost_utils.sync_global_devices(f"stage {name} done")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(marker), exist_ok=True)  # a stage need not write files of its own
            tmp = marker + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2, sort_keys=True)
            os.replace(tmp, marker)  # atomic: a crash never leaves half a marker
        logging.info("stage %s: done in %.1f s", name, summary["seconds"])
        summaries[name] = summary
    return summaries
