"""The ALDM control step: amortised cost over the plain conditioner step, and memory.

Both steps are the SAME compiled program family (`sdsup.aldm`) at the
config's model sizes with random weights; "plain" never takes the lazy
adversarial branch (the plain-conditioner baseline: noise loss only), "aldm"
takes it every n_lazy-th step (n_lazy=8, K=9 as in ALDM). The ratio is
measured in one run, over whole lazy periods.

Lower bound: a lazy step needs at least the K+1 forward passes of the
conditioned UNet on top of a plain step's forward and backward, so even with
a free VAE decoder and segmenter the ratio is about 1 + (K+1) * F / (8 * P),
F a forward and P a plain step (P ~ 2.5-3.5 F with the UNet frozen).
"""

import dataclasses
import os
import time

import jax
import numpy as np

from sdsup import aldm, config_lib, parallel, stages
from sdsup.data import scenes
from sdsup.stages import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg: str):
    return config_lib.load(os.path.join(ROOT, "configs", "scenes.py"), arg)


def _batch(ctx, tok, n):
    size = ctx.config.data.image_size
    examples = [scenes.make_example(0, "train", i, size) for i in range(n)]
    local = {"image": np.stack([e["image"] for e in examples]), "label": np.stack([e["label"] for e in examples]),
             "tokens": tok.encode_batch([e["caption"] for e in examples])}
    return parallel.global_batch(local, ctx.mesh)


def aldm_step_ratio(config_arg: str = "", periods: int = 2):
    config = _config(config_arg)
    with config.unlocked():
        config.fast_compile = False  # measure the real step, not the quick-compile one
    mesh = parallel.make_mesh({"data": -1}, devices=jax.devices()[:1])
    ctx = stages.Context(config=config, workdir=None, mesh=mesh)
    setup, params = aldm.random_setup(config, ctx.tokenizer, mesh)
    frozen = setup.frozen(mesh, params["unet"], params["vae"], params["text_encoder"])
    batch_size = config.control.batch_size
    batch = _batch(ctx, setup.tok, batch_size)
    results = {}
    for name, n_lazy in (("aldm", 8), ("plain", 10 ** 9)):
        # ALDM's real-data schedule; lambda_adv 0.5 (a step input) only scales the term.
        settings = dataclasses.replace(setup.settings, n_lazy=n_lazy, unroll_steps=9, grid_steps=25, ramp_start=0,
                                       ramp_end=0)
        state, shardings = setup.create_state(mesh, params["unet"], jax.random.PRNGKey(0))
        start = time.perf_counter()
        step = common.compile_step(setup.step(shardings, settings), state, ctx, batch_size, frozen)
        compile_s = time.perf_counter() - start
        rng = jax.random.PRNGKey(0)
        # Step 0 is lazy for both; run past it, then time whole periods of 8 steps.
        for i in range(1, 9 if name == "aldm" else 2):
            state, metrics = step(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready(state)
        start = time.perf_counter()
        n = 8 * periods
        for i in range(n):
            state, metrics = step(state, batch, jax.random.fold_in(rng, 100 + i))
        jax.block_until_ready(state)
        mem = step.compiled.memory_analysis()
        results[name] = {"seconds_per_step": (time.perf_counter() - start) / n, "compile_s": compile_s,
                         "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
                         "argument_bytes": getattr(mem, "argument_size_in_bytes", None)}
    adversarial, plain = results["aldm"]["seconds_per_step"], results["plain"]["seconds_per_step"]
    return {"name": "aldm_step_ratio", "value": round(adversarial, 4), "unit": "s/step (amortised)",
            "baseline": round(plain, 4), "ratio": round(adversarial / plain, 3), "goal": "ratio <= 1.6",
            "config": f"configs/scenes.py{':' + config_arg if config_arg else ''}, batch {batch_size}, "
                      "n_lazy 8, K 9, 25-step grid",
            "compile_s": {k: round(v["compile_s"], 1) for k, v in results.items()},
            "per_device_memory_mib": {k: round(((v["temp_bytes"] or 0) + (v["argument_bytes"] or 0)) / 2 ** 20, 1)
                                      for k, v in results.items()}}


BENCHMARKS = {"aldm_step_ratio": aldm_step_ratio}
