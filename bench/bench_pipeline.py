"""Text -> layout -> image latency of sdsup vs the exported pipeline run by PyTorch diffusers.

The models are those of the default config (`configs/scenes.py`: 64x64
images, 16x16x4 latents), with random weights written as a training workdir
(no training needed; set SDSUP_BENCH_WORKDIR to time a trained one). That
workdir is exported with `python -m sdsup.convert export`, and the
exported `StableDiffusionControlNetPipeline` samples with the same layouts,
the same initial noise, 25 DDIM steps and classifier-free guidance, on the
same 2 CPU threads. The sdsup text -> layout part has no PyTorch
counterpart: it is reported beside the comparison, which is image
generation alone (same work on both sides). The two sides' images are also
compared (max |difference|), so the timing is of the same computation.

Medians over `repeats` calls after one warm-up call (the warm-up compiles).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, GUIDANCE = 25, 3.0
PROMPT = "sky over grass with a lake on the left. a red house right of the lake. a sun at the top."


def _config():
    from sdsup import config_lib

    return config_lib.load(os.path.join(ROOT, "configs", "scenes.py"))


def random_workdir(root: str, config) -> str:
    """A workdir whose vae, ldm, layout and control stages hold random weights of the config's sizes."""
    import flax.linen as nn
    import jax

    from sdsup import config_lib, parallel, stages
    from sdsup.data import registry
    from sdsup.models import io as model_io
    from sdsup.models.controlnet import ControlNetModel, dummy_inputs
    from sdsup.models.layout import LayoutModel, dummy_inputs as layout_inputs
    from sdsup.stages import control, layout, ldm, vae

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    ctx = stages.Context(config=config, workdir=root, mesh=mesh)
    spec = registry.get(config.data.name)
    unet_config, text_config = ldm.model_configs(ctx)
    vae_config = vae.model_config(ctx)
    table = np.random.default_rng(0).standard_normal((spec.num_classes, text_config.hidden_size)).astype(np.float32)
    setup_inits = control.frozen_model_inits(ctx, unet_config, vae_config, text_config)
    cn_config = control.controlnet_config(ctx, unet_config, table.shape[1])
    layout_config = layout.model_config(ctx, spec.num_classes, text_config.hidden_size)
    latent = config.data.image_size // vae_config.downsample_factor
    inits = dict(setup_inits,
                 controlnet=lambda: ControlNetModel(cn_config).init(jax.random.PRNGKey(0),
                                                                    *dummy_inputs(cn_config, 1, latent))["params"],
                 layout=lambda: LayoutModel(layout_config).init(
                     jax.random.PRNGKey(0), *layout_inputs(layout_config, config.text.max_length))["params"])
    params = {k: model_io.random_like(nn.meta.unbox(jax.eval_shape(f)), i) for i, (k, f) in enumerate(inits.items())}
    params["vae"]["decoder"]["conv_out"]["kernel"] *= 0.3  # decoded images mostly inside [-1, 1]
    for rel, kind, cfg, p in (("vae/model", "vae", vae_config, params["vae"]),
                              ("ldm/unet", "unet", unet_config, params["unet"]),
                              ("ldm/text_encoder", "text_encoder", text_config, params["text_encoder"]),
                              ("layout/model", "layout", layout_config, params["layout"]),
                              ("control/controlnet", "controlnet", cn_config, params["controlnet"])):
        model_io.save(os.path.join(root, rel), kind, cfg, p)
    np.save(os.path.join(root, "control", "class_table.npy"), table)
    for stage in ("vae", "ldm", "layout", "control"):
        with open(stages.done_marker(root, stage), "w") as f:
            json.dump({"random_weights": True}, f)
    return root


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compiles (sdsup) / allocates (torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _latency(batch: int, repeats: int = 3) -> dict:
    import jax
    import torch

    from sdsup import inference
    from sdsup.stages import control

    torch.set_num_threads(2)  # the same two cores XLA uses
    tmp = tempfile.mkdtemp(prefix="sdsup_bench_pipeline_")
    try:
        workdir = os.environ.get("SDSUP_BENCH_WORKDIR") or random_workdir(os.path.join(tmp, "run"), _config())
        out = os.path.join(tmp, "pipe")
        result = subprocess.run([sys.executable, "-m", "sdsup.convert", "export", f"--from={workdir}", f"--out={out}"],
                                capture_output=True, text=True, cwd=ROOT)
        if result.returncode:
            raise RuntimeError(f"export failed: {result.stderr[-2000:]}")
        gen = inference.Generator.from_workdir(workdir)
        gen.config.sampling.steps = STEPS
        size, latent_size = gen.size, gen.size // 4
        tokens = gen.tokens(PROMPT, batch)
        rng = jax.random.PRNGKey(0)
        layouts = {}

        def text_to_layout():
            layouts["ids"] = gen.layouts(PROMPT, batch, seed=0)

        def sdsup_images():
            layouts["images"] = control.generate(gen.ctx, tokens, layouts["ids"], rng, guidance=GUIDANCE)

        layout_s = _median_time(text_to_layout, repeats)
        image_s = _median_time(sdsup_images, repeats)

        import diffusers
        import importlib.util

        pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(out, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        spec = importlib.util.spec_from_file_location("layout_pipeline", os.path.join(out, "layout_pipeline.py"))
        layout_pipeline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(layout_pipeline)
        # sdsup's sampler draws its initial latents as jax.random.normal(rng, ...): give torch the same noise.
        noise = np.asarray(jax.random.normal(rng, (batch, latent_size, latent_size, 4)))
        latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))

        def torch_images():
            with torch.no_grad():
                layouts["torch"] = layout_pipeline.generate(pipe, [PROMPT] * batch, torch.from_numpy(
                    layouts["ids"].astype(np.int64)), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=latents)

        torch_s = _median_time(torch_images, repeats)
        diff = float(np.max(np.abs(layouts["images"].astype(np.float32) / 255.0 - layouts["torch"])))
        return {"name": f"text_layout_image_latency_b{batch}", "value": round(image_s, 4), "unit": "s/batch",
                "baseline": round(torch_s, 4), "ratio": round(image_s / torch_s, 3),
                "text_to_layout_s": round(layout_s, 4), "text_layout_image_s": round(layout_s + image_s, 4),
                "max_abs_image_diff": round(diff, 4),
                "config": f"configs/scenes.py default sizes, {size}x{size}, batch {batch}, {STEPS} DDIM steps, "
                          f"CFG {GUIDANCE}, layout {gen.config.layout.sampling.steps} unmasking steps; value = sdsup "
                          "image generation, baseline = the exported diffusers pipeline (same weights, layouts, "
                          "noise; torch 2 threads)",
                "weights": "trained: " + workdir if os.environ.get("SDSUP_BENCH_WORKDIR") else "random"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


BENCHMARKS = {
    "text_layout_image_latency_b1": lambda: _latency(1),
    "text_layout_image_latency_b8": lambda: _latency(8),
}
