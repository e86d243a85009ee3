"""Stage `evaluate`: `sdsup.evaluation.suite` on the run's finished stages (what `python -m sdsup.evaluate` does)."""

from __future__ import annotations

from sdsup.evaluation import suite
from sdsup.stages import common

NAME = "evaluate"


def run(ctx: common.Context) -> dict:
    metrics = suite.evaluate_workdir(ctx.workdir, ctx.config, ctx.dataset, ctx.sampling())
    return {k: v for k, v in metrics.items() if "/iou/" not in k}
