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

from PIL import Image

from sdsup import aldm, config_lib, parallel, stages
from sdsup.data import latent_cache, scenes
from sdsup.stages import common
from sdsup.trainer import loop

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


# SD-1.5's architecture at 1/8 of its widths (UNet, CLIP-L text transformer, VAE, CSAIL UperNet-R101), so the
# parts keep SD's proportions of the step's FLOPs at a size two CPU cores step through.
SD_EIGHTH = {
    "ldm.unet": dict(block_out_channels=(40, 80, 160, 160),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     attention_head_dim=8, norm_num_groups=8, layers_per_block=2, remat=False),
    "ldm.text_encoder": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=96, hidden_act="quick_gelu"),
    "vae.model": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=8,
                      mid_block_add_attention=True, remat=False),
    "discriminator.model": dict(style="csail", stem_channels=(8, 8, 16), hidden_sizes=(32, 64, 128, 256),
                                depths=(3, 4, 23, 3), layer_type="bottleneck", head_channels=64, ppm_channels=64,
                                pool_scales=(1, 2, 3, 6)),
}


def _sd_eighth_config(image_size: int, batch_size: int):
    config = _config("")
    with config.unlocked():
        for key, value in SD_EIGHTH.items():
            section, name = key.split(".")
            config[section][name] = value
        config.data.image_size = image_size
        config.text.max_length = 77
        config.control.update(batch_size=batch_size, micro_batches=1, n_lazy=8, unroll_steps=9, grid_steps=25,
                              ramp_start=0, ramp_end=0, hint_channels=(64, 32), caption_dropout=0.1)
        config.fast_compile = False
    return config


def _random_batch(setup, mesh, batch_size: int, cached: bool, seed: int = 0) -> dict:
    """Random inputs of the step's shapes (the values do not change its time)."""
    rng = np.random.default_rng(seed)
    local = {}
    for name, (shape, dtype) in setup.batch_shapes(batch_size, cached).items():
        if name == "label":
            local[name] = rng.integers(0, setup.spec.num_classes, shape).astype(dtype)
        elif name == "tokens":
            local[name] = rng.integers(4, setup.tok.vocab_size, shape).astype(dtype)
        elif np.dtype(dtype) == np.uint8:
            local[name] = rng.integers(0, 256, shape).astype(dtype)
        else:
            local[name] = rng.normal(size=shape).astype(dtype)
    return parallel.global_batch(local, mesh)


def latent_cache_step(image_size: int = 256, batch_size: int = 4, periods: int = 2):
    """Control-step time with the latent cache (latents, reconstructions, text states read from the batch)
    against without (the frozen VAE encoder, decoder and text encoder run in the step), same run.

    SD-1.5's networks at 1/8 width (`SD_EIGHTH`), 256x256 images, batch 4, ALDM's schedule (a lazy step
    every 8th, K 9 on a 25-step grid); amortised over whole lazy periods. Also XLA's FLOPs per step (both
    branches of the lazy `cond` counted) and the cache's bytes per example at SD-1.5's real shapes (512x512,
    64x64x4 latents, 77 x 768 text states, one caption; a photo-like reconstruction as PNG).
    """
    config = _sd_eighth_config(image_size, batch_size)
    mesh = parallel.make_mesh({"data": -1}, devices=jax.devices()[:1])
    ctx = stages.Context(config=config, workdir=None, mesh=mesh)
    setup, params = aldm.random_setup(config, ctx.tokenizer, mesh)
    frozen = setup.frozen(mesh, params["unet"], params["vae"], params["text_encoder"])
    results = {}
    for cached in (False, True):
        state, shardings = setup.create_state(mesh, params["unet"], jax.random.PRNGKey(0))
        start = time.perf_counter()
        step = common.compile_step(setup.step(shardings), state, ctx, batch_size, frozen,
                                   batch_shapes=setup.batch_shapes(batch_size, cached))
        compile_s = time.perf_counter() - start
        batch = _random_batch(setup, mesh, batch_size, cached)
        rng = jax.random.PRNGKey(0)
        for i in range(8):  # one whole period first: warm caches and allocations
            state, _ = step(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready(state)
        start = time.perf_counter()
        n = 8 * periods
        for i in range(n):
            state, _ = step(state, batch, jax.random.fold_in(rng, 100 + i))
        jax.block_until_ready(state)
        results[cached] = {"seconds_per_step": (time.perf_counter() - start) / n, "compile_s": compile_s,
                           "tflops_per_step": (loop.step_flops(step) or 0.0) / 1e12}
    with_cache, without = results[True]["seconds_per_step"], results[False]["seconds_per_step"]
    return {"name": "latent_cache_step", "value": round(with_cache, 4), "unit": "s/step (amortised)",
            "baseline": round(without, 4), "ratio": round(with_cache / without, 3), "goal": "ratio <= 0.8",
            "config": f"SD-1.5 networks at 1/8 width (SD_EIGHTH), {image_size}x{image_size}, batch {batch_size}, "
                      "n_lazy 8, K 9, 25-step grid, 1 device",
            "xla_tflops_per_step": {"cache": round(results[True]["tflops_per_step"], 4),
                                    "no_cache": round(results[False]["tflops_per_step"], 4)},
            "compile_s": {"cache": round(results[True]["compile_s"], 1),
                          "no_cache": round(results[False]["compile_s"], 1)},
            "cache_bytes_per_example_sd15": sd15_cache_bytes()}


def sd15_cache_bytes() -> int:
    """One cache record at SD-1.5's shapes: both orientations' 64x64x4 latents (mean, log-variance) and
    512x512 reconstructions, one caption's 77 x 768 states."""
    rng = np.random.default_rng(0)
    coarse = rng.random((6, 8, 3)) * 255
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((512, 512), Image.Resampling.BICUBIC), float)
    photo = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    latents = rng.normal(size=(2, 64, 64, 4))
    record = latent_cache.encode_record(latents, latents, [photo, photo[:, ::-1]], rng.normal(size=(1, 1, 77, 768)))
    return len(record)


BENCHMARKS = {"aldm_step_ratio": aldm_step_ratio, "latent_cache_step": latent_cache_step}
