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

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from sdsup import aldm, config_lib, inference, model_configs, pipelines
from sdsup.data import dataset, registry
from sdsup.models import io as model_io
from sdsup.models.controlnet import ControlNetModel, dummy_inputs
from sdsup.models.layout import LayoutModel, dummy_inputs as layout_inputs
from sdsup.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, GUIDANCE = 25, 3.0
PROMPT = "sky over grass with a lake on the left. a red house right of the lake. a sun at the top."


def _config():
    return config_lib.load(os.path.join(ROOT, "configs", "scenes.py"))


def random_workdir(root: str, config) -> str:
    """A workdir whose vae, ldm, layout and control stages hold random weights of the config's sizes."""
    workdir = Workdir(root)
    workdir.write_config(config_lib.to_json(config))
    spec = registry.for_config(config.data)
    unet_config, text_config = model_configs.ldm(config, dataset.text_tokenizer(config))
    vae_config = model_configs.vae(config)
    table = np.random.default_rng(0).standard_normal((spec.num_classes, text_config.hidden_size)).astype(np.float32)
    cn_config = model_configs.controlnet(config, unet_config, table.shape[1], vae_config)
    layout_config = model_configs.layout(config, spec.num_classes, text_config.hidden_size)
    latent = config.data.image_size // vae_config.downsample_factor
    inits = dict(aldm.frozen_model_inits(config, unet_config, vae_config, text_config),
                 controlnet=lambda: ControlNetModel(cn_config).init(jax.random.PRNGKey(0),
                                                                    *dummy_inputs(cn_config, 1, latent))["params"],
                 layout=lambda: LayoutModel(layout_config).init(
                     jax.random.PRNGKey(0), *layout_inputs(layout_config, config.text.max_length))["params"])
    params = {k: model_io.random_like(nn.meta.unbox(jax.eval_shape(f)), i) for i, (k, f) in enumerate(inits.items())}
    params["vae"]["decoder"]["conv_out"]["kernel"] *= 0.3  # decoded images mostly inside [-1, 1]
    workdir.save_model("vae", "model", "vae", vae_config, params["vae"])
    workdir.save_model("ldm", "unet", "unet", unet_config, params["unet"])
    workdir.save_model("ldm", "text_encoder", "text_encoder", text_config, params["text_encoder"])
    workdir.save_model("layout", "model", "layout", layout_config, params["layout"])
    workdir.save_conditioner(cn_config, params["controlnet"], table)
    for stage in ("vae", "ldm", "layout", "control"):
        workdir.mark_done(stage, {"random_weights": True})
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
    import torch  # deferred: PyTorch is the test extra's, only the comparison needs it

    torch.set_num_threads(2)  # the same two cores XLA uses
    tmp = tempfile.mkdtemp(prefix="sdsup_bench_pipeline_")
    try:
        workdir = os.environ.get("SDSUP_BENCH_WORKDIR") or random_workdir(os.path.join(tmp, "run"), _config())
        out = os.path.join(tmp, "pipe")
        result = subprocess.run([sys.executable, "-m", "sdsup.convert", "export", f"--from={workdir}", f"--out={out}"],
                                capture_output=True, text=True, cwd=ROOT)
        if result.returncode:
            raise RuntimeError(f"export failed: {result.stderr[-2000:]}")
        session = inference.Session.from_workdir(workdir)
        settings = session.settings.with_overrides(steps=STEPS, guidance=GUIDANCE)
        size, latent_size = session.size, session.size // 4
        tokens = session.tokens(PROMPT, batch)
        rng = jax.random.PRNGKey(0)
        layouts = {}

        def text_to_layout():
            layouts["ids"] = session.layouts(PROMPT, batch, seed=0)

        def sdsup_images():
            layouts["images"] = pipelines.layout_to_image(session.image_models(), tokens, layouts["ids"], rng,
                                                          settings)

        layout_s = _median_time(text_to_layout, repeats)
        image_s = _median_time(sdsup_images, repeats)

        import diffusers  # deferred with torch

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
                          f"CFG {GUIDANCE}, layout {session.config.layout.sampling.steps} unmasking steps; value = sdsup "
                          "image generation, baseline = the exported diffusers pipeline (same weights, layouts, "
                          "noise; torch 2 threads)",
                "weights": "trained: " + workdir if os.environ.get("SDSUP_BENCH_WORKDIR") else "random"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


BENCHMARKS = {
    "text_layout_image_latency_b1": lambda: _latency(1),
    "text_layout_image_latency_b8": lambda: _latency(8),
}
