"""ALDM at Stable Diffusion scale, on paper, for each real config: compiled ahead of time, nothing allocated.

For `configs/aldm.py:ade20k` and `:cityscapes`, the control step (`sdsup.aldm`) with SD-1.5's UNet
(frozen, bf16 compute, rematerialised blocks), its ControlNet (class-embedding layout at 1/4 size,
768-wide CLIP vectors, ALDM's hint block; trainable, AdamW, EMA), SD's VAE decoder (with gradient,
rematerialised, bf16), CLIP ViT-L/14's text transformer and CSAIL's UperNet-ResNet101 discriminator
with N + 1 outputs (trainable, AdamW), at 512x512, n_lazy 8, K 9 on a 25-step grid; ADE20K reads the
latent cache (the VAE encoder and text encoder do not run in the step), Cityscapes' random crops run
them. Compiled on a fake 8-device FSDP mesh (data=1, fsdp=8) with every input a ShapeDtypeStruct, the
ops traced in their GPU/TPU formulation (`sdsup.models.ops.dispatch`), at 4 examples per device in 4
micro-batches of 1 (ALDM's per-GPU batch) and in 2 micro-batches of 2.

Reported per config:
  * per-chip memory for TPU v5e-256, TPU v4-64 (32 chips), 8x A100 80GB and 8x H100 80GB: this
    device's shard of the train state and frozen weights, recomputed exactly for the best (data, fsdp)
    factorisation of each machine with fsdp >= 8 (a leaf whose sharded dimensions the fsdp size does not
    divide stays replicated), plus the temporaries XLA measured at fsdp=8 (FSDP gathers each layer's
    weights whole, so they do not shrink with more chips); at 4 per chip, and the largest micro-batch
    that fits (temporaries linear in the micro-batch, from the two compiles);
  * FLOPs per example and step: XLA's count of the compiled step is a lower bound (it takes every loop
    body once: one micro-batch, one unrolled DDIM step), so the step's FLOPs are also counted from its
    parts: each network's forward pass lowered alone (`network_tflops`), combined as the step runs them
    (`aldm_tflops_per_example`);
  * the projected time for the paper's step count (global batch 8) at 40% MFU of each machine's bf16
    peak.

XLA:CPU's buffer assignment is not a TPU's: it drops rematerialisation (it expands the optimisation
barriers `jax.checkpoint` leaves and CSE merges the recomputation back) and converts bf16 weights to
float32 for its convolutions, so the temporaries are an upper bound of a TPU's. Measured earlier
(UperNet-R50 discriminator, CPU kernels): gathering the VAE's and the segmenter's weights before use
(`sharding.gathered`) took the per-chip peak from 20.2 to 15.3 GiB; sharding constraints on every block
output, or gathering weights layer by layer, measured worse on XLA:CPU and are not in the models.

Runs in child processes: the 8 fake devices must be set before jax starts.
"""

import json
import math
import os
import subprocess
import sys
import time

from sdsup import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_DEVICE_BATCH = 4  # ALDM's per-GPU batch
MICRO_SIZES = (1, 2)  # examples per micro-batch in the two compiles
FAKE_DEVICES = 8
COMPUTE_DTYPE = os.environ.get("SDSUP_SCALE_DTYPE", "bfloat16")
MFU = 0.4
GIB = 2.0 ** 30
# name: (chips, HBM GiB per chip, dense bf16 peak TFLOP/s per chip)
HARDWARE = {
    "tpu_v5e_256": (256, 16, 197),
    "tpu_v4_64": (32, 32, 275),  # v4-64 counts TensorCores: 32 chips
    "8x_a100_80gb": (8, 80, 312),
    "8x_h100_80gb": (8, 80, 989),
}
USABLE_HBM = 0.92  # what a framework leaves for the program (runtime, fragmentation)


def _config(dataset: str, micro_size: int):
    c = config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), dataset)
    with c.unlocked():
        c.pretrained = "/unused"  # the networks are built here, with SD-1.5's shapes
        c.control.update(batch_size=PER_DEVICE_BATCH * FAKE_DEVICES, micro_batches=PER_DEVICE_BATCH // micro_size,
                         discriminator_dtype=COMPUTE_DTYPE)
        c.fast_compile = True  # memory and FLOPs come from HLO passes; LLVM's effort does not change them
    return c


def _models():
    from sdsup.models import clip_text, unet, vae

    unet_config = unet.UNetConfig(**{**unet.STABLE_DIFFUSION_1_5.__dict__, "dtype": COMPUTE_DTYPE, "remat": True})
    vae_config = vae.VAEConfig(**{**vae.STABLE_DIFFUSION_1_5.__dict__, "dtype": COMPUTE_DTYPE, "remat": True})
    text_config = clip_text.CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768,
                                           num_hidden_layers=12, num_attention_heads=12)
    return unet_config, vae_config, text_config


class _MeshShape:
    """Just enough of a Mesh for `sharding.fit_spec`: axis sizes of a machine we do not have."""

    def __init__(self, **shape):
        self.shape = shape


def _shard_bytes(abstract_boxed, mesh_like) -> int:
    """Bytes of one device's shard of every leaf under FSDP_RULES on `mesh_like`."""
    import flax.linen as nn
    import jax

    from sdsup.trainer import sharding

    specs = jax.tree.leaves(sharding.logical_specs(abstract_boxed, mesh_like),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    total = 0
    for spec, leaf in zip(specs, jax.tree.leaves(nn.meta.unbox(abstract_boxed))):
        shard = list(leaf.shape)
        for i, axes in enumerate(spec):
            for a in () if axes is None else (axes,) if isinstance(axes, str) else axes:
                shard[i] //= mesh_like.shape[a]
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def _meshes(chips: int):
    """Every (data, fsdp) factorisation of `chips` with fsdp >= the fake mesh's (or all chips, if fewer)."""
    out, f = [], min(FAKE_DEVICES, chips)
    while f <= chips:
        out.append(_MeshShape(data=chips // f, fsdp=f))
        f *= 2
    return out


def _setup(mesh, config):
    """(setup, boxed train state, boxed frozen weights, class table) of the control step at SD-1.5's shapes."""
    import jax
    import numpy as np

    from sdsup import aldm
    from sdsup.data import registry, tokenizers

    spec = registry.for_config(config.data)
    tok = tokenizers.WordTokenizer.scenes(77)  # only the empty prompt's ids are used; shapes are what matter
    unet_config, vae_config, text_config = _models()
    table = np.zeros((spec.num_classes, text_config.hidden_size), np.float32)
    setup = aldm.Setup(config, spec, tok, unet_config, vae_config, text_config, table, mesh)
    boxed_state = jax.eval_shape(setup.init, jax.random.PRNGKey(0))
    boxed_frozen = {name: jax.eval_shape(init) for name, init in setup.frozen_inits().items()}
    return setup, boxed_state, boxed_frozen, table


def network_tflops(config) -> dict:
    """Forward TFLOPs of one 512x512 example through each network of the step, each lowered alone."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sdsup import model_configs
    from sdsup.data import registry
    from sdsup.models import clip_text, controlnet, unet, vae

    unet_config, vae_config, text_config = _models()
    unet_config = dataclasses.replace(unet_config, dtype="float32", remat=False)
    vae_config = dataclasses.replace(vae_config, dtype="float32", remat=False)
    cn_config = model_configs.controlnet(config, unet_config, text_config.hidden_size, vae_config)
    seg_config = model_configs.discriminator(config, registry.for_config(config.data).num_classes)
    seg = model_configs.segmenter_network(seg_config)
    size, lat, length, dim = 512, 512 // vae_config.downsample_factor, 77, text_config.hidden_size
    k = cn_config.hint_downsample
    f32 = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    u, v, t, c = (unet.UNet2DConditionModel(unet_config), vae.AutoencoderKL(vae_config),
                  clip_text.CLIPTextTransformer(text_config), controlnet.ControlNetModel(cn_config))
    z, step, ctx = f32(1, lat, lat, 4), f32(1, dt=jnp.int32), f32(1, length, dim)
    hint = f32(1, lat * k, lat * k, cn_config.conditioning_channels)
    image, tokens = f32(1, size, size, 3), f32(1, length, dt=jnp.int32)
    nets = {
        "unet": (u, (z, step, ctx), lambda p, *a: u.apply(p, *a), (z, step, ctx)),
        "controlnet": (c, (z, step, ctx, hint), lambda p, *a: c.apply(p, *a), (z, step, ctx, hint)),
        "vae_encoder": (v, (image,), lambda p, x: v.apply(p, x, method=v.encode).mean, (image,)),
        "vae_decoder": (v, (image,), lambda p, x: v.apply(p, x, method=v.decode), (z,)),
        "text_encoder": (t, (tokens,), lambda p, x: t.apply(p, x).last_hidden_state, (tokens,)),
        "discriminator": (seg, (f32(2, size, size, 3),), lambda p, x: seg.apply(p, x, train=False), (image,)),
    }
    out = {}
    for name, (module, init_args, forward, inputs) in nets.items():
        kwargs = {"train": False} if module is seg else {}
        variables = nn.meta.unbox(jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs),
                                                 *init_args))
        analysis = jax.jit(forward).lower(variables, *inputs).cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        out[name] = float(analysis["flops"]) / 1e12
    return out


def aldm_tflops_per_example(f: dict, unroll: int, n_lazy: int, cached: bool) -> dict:
    """The step's TFLOPs per example from its networks' forward passes `f` (a backward pass ~ 2 forwards for
    trained weights, 1 for an input gradient through frozen ones; rematerialised parts run forward twice).

    Every step: (VAE encoder + text encoder, unless cached) + ControlNet forward and backward + UNet forward
    and input gradient. Every n_lazy-th step adds: the decoder on x0 with its input gradient, rematerialised
    (3 decoder passes), the discriminator on it with its input gradient (2), K unrolled steps each through
    UNet + ControlNet + decoder + discriminator forward, the real image's decode (unless cached) and the
    discriminator's own update on real and fake images (2 x 3).
    """
    plain = (0.0 if cached else f["vae_encoder"] + f["text_encoder"]) + 3 * f["controlnet"] + 2 * f["unet"]
    extra = (3 * f["vae_decoder"] + 2 * f["discriminator"]
             + unroll * (f["unet"] + f["controlnet"] + f["vae_decoder"] + f["discriminator"])
             + (0.0 if cached else f["vae_decoder"]) + 6 * f["discriminator"])
    return {"plain_step": plain, "adversarial_step": plain + extra, "average": plain + extra / n_lazy}


def child(dataset: str, micro_size: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sdsup import parallel, stages
    from sdsup.models.ops import dispatch
    from sdsup.stages import common
    from sdsup.trainer import sharding

    dispatch.backend = lambda: "tpu"  # trace the ops as they run on TPU / GPU, not XLA:CPU's kernels
    config = _config(dataset, micro_size)
    mesh = parallel.make_mesh({"data": 1, "fsdp": FAKE_DEVICES})
    setup, boxed_state, boxed_frozen, table = _setup(mesh, config)
    ctx = stages.Context(config=config, workdir=None, mesh=mesh)
    state_shardings = sharding.logical_shardings(boxed_state, mesh)
    state = sharding.sharded_abstract(boxed_state, mesh)
    frozen = setup.abstract_frozen(mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
    cached = bool(config.control.get("latent_cache", False))
    batch = common.abstract_batch(ctx, config.control.batch_size,
                                  setup.batch_shapes(config.control.batch_size, cached=cached))
    start = time.perf_counter()
    compiled = setup.step(state_shardings).lower(state, batch, rng, frozen).compile(
        compiler_options=common.compiler_options(ctx))
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    boxed_all = {"state": boxed_state, "frozen": boxed_frozen}
    arguments = {name: min(_shard_bytes(boxed_all, m) + table.nbytes for m in _meshes(chips))
                 for name, (chips, _, _) in HARDWARE.items()}
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))  # noqa: E731
    return {"temporaries_gib": mem.temp_size_in_bytes / GIB, "arguments_gib": {k: v / GIB for k, v in arguments.items()},
            "xla_tflops_per_device_step": float(analysis.get("flops", 0.0)) / 1e12, "compile_s": compile_s,
            "cached": cached, "network_tflops": network_tflops(config) if micro_size == MICRO_SIZES[0] else None,
            "parameters_millions": {"trainable_controlnet": round(count(boxed_state["gen"]["params"]) / 1e6, 1),
                                    "trainable_segmenter": round(count(boxed_state["seg"]["params"]) / 1e6, 1),
                                    "frozen": {k: round(count(v) / 1e6, 1) for k, v in boxed_frozen.items()}}}


def _run_child(dataset: str, micro_size: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={FAKE_DEVICES}",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", dataset, str(micro_size)], env=env,
                          capture_output=True, text=True, timeout=5400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def on_paper(dataset: str) -> dict:
    config = _config(dataset, MICRO_SIZES[0])
    runs = {m: _run_child(dataset, m) for m in MICRO_SIZES}
    first, second = runs[MICRO_SIZES[0]], runs[MICRO_SIZES[1]]
    per_example_gib = (second["temporaries_gib"] - first["temporaries_gib"]) / (MICRO_SIZES[1] - MICRO_SIZES[0])
    base_gib = first["temporaries_gib"] - per_example_gib * MICRO_SIZES[0]
    flops = aldm_tflops_per_example(first["network_tflops"], int(config.control.unroll_steps),
                                    int(config.control.n_lazy), first["cached"])
    # The paper's global batch (8), not the fake mesh's: _config sizes the compiled step at 4 per device.
    paper = config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), dataset)
    examples = int(paper.control.num_steps) * int(paper.control.batch_size)
    machines = {}
    for name, (chips, hbm, peak) in HARDWARE.items():
        args = first["arguments_gib"][name]
        at_4 = args + first["temporaries_gib"]
        room = hbm * USABLE_HBM - args - base_gib
        machines[name] = {
            "gib_per_chip_at_4": round(at_4, 2), "fits_at_4": at_4 <= hbm * USABLE_HBM,
            "largest_micro_batch": max(0, int(room // per_example_gib)) if per_example_gib > 0 else None,
            "hours_for_paper_steps_at_40pct_mfu": round(examples * flops["average"] / (chips * peak * MFU) / 3600, 1),
        }
    v5e = machines["tpu_v5e_256"]
    return {
        "name": f"aldm_{dataset}_on_paper", "value": v5e["gib_per_chip_at_4"], "unit": "GiB per chip (v5e-256, 4 per chip)",
        "goal": "value <= 16" if dataset == "ade20k" else None,
        "config": f"configs/aldm.py:{dataset}: SD-1.5 + ControlNet (ALDM hint) + SD VAE decoder + CSAIL UperNet-R101 "
                  f"({'latent cache' if first['cached'] else 'encoders in the step'}), 512x512, 4 per device in "
                  f"micro-batches of {MICRO_SIZES}, n_lazy 8, K 9, {COMPUTE_DTYPE}",
        "machines": machines,
        "temporaries_gib": {m: round(r["temporaries_gib"], 2) for m, r in runs.items()},
        "temporaries_per_micro_batch_example_gib": round(per_example_gib, 2),
        "tflops_per_example": {k: round(v, 2) for k, v in flops.items()},
        "network_forward_tflops": {k: round(v, 3) for k, v in first["network_tflops"].items()},
        "xla_tflops_per_device_step_lower_bound": round(first["xla_tflops_per_device_step"], 2),
        "parameters_millions": first["parameters_millions"],
        "compile_s": {m: round(r["compile_s"], 1) for m, r in runs.items()},
        "mfu_assumed": MFU,
    }


BENCHMARKS = {"aldm_ade20k_on_paper": lambda: on_paper("ade20k"),
              "aldm_cityscapes_on_paper": lambda: on_paper("cityscapes")}

if __name__ == "__main__" and "--child" in sys.argv:
    i = sys.argv.index("--child")
    print(json.dumps(child(sys.argv[i + 1], int(sys.argv[i + 2]))), flush=True)
