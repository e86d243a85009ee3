"""Training stages, run in the order a config lists them.

A stage is a module with `NAME` and `run(ctx: common.Context) -> dict`. It
leaves its outputs under `ctx.stage_dir(NAME)` (where `sdsup.workdir` says);
when it returns, a DONE.json with its summary marks it finished, so
re-running a config skips it. A stage that was interrupted has no DONE.json
and runs again (resuming from its own checkpoints, where it has them).
"""

from __future__ import annotations

import time
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils

from sdsup import config_lib
from sdsup.stages import control, data, discriminator, evalseg, evaluate, layout, ldm, planner, vae
from sdsup.stages.common import Context

STAGES = {m.NAME: m.run for m in (data, vae, ldm, layout, planner, discriminator, control, evalseg, evaluate)}
assert tuple(STAGES) == config_lib.STAGES, "sdsup.stages and config_lib.STAGES list different stages"


def run_all(ctx: Context, only: Optional[list] = None) -> dict:
    """Runs the config's stages in order, skipping finished ones."""
    summaries = {}
    for name in ctx.config.stages:
        if only and name not in only:
            continue
        if ctx.workdir.is_done(name):
            logging.info("stage %s: finished earlier (%s), skipping", name, ctx.workdir.done_marker(name))
            summaries[name] = ctx.workdir.summary(name)
            continue
        logging.info("stage %s: starting", name)
        start = time.time()
        ctx.compile_seconds = 0.0
        summary = dict(STAGES[name](ctx) or {})
        summary["seconds"] = round(time.time() - start, 2)
        if ctx.compile_seconds:  # the train step's ahead-of-time compile (common.compile_step)
            summary["compile_s"] = round(ctx.compile_seconds, 2)
        multihost_utils.sync_global_devices(f"stage {name} done")
        if jax.process_index() == 0:
            ctx.workdir.mark_done(name, summary)
        logging.info("stage %s: done in %.1f s", name, summary["seconds"])
        summaries[name] = summary
    return summaries
