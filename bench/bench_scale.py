"""ALDM at Stable Diffusion scale, on paper: compiled ahead of time, nothing allocated.

The ALDM control step (`sdsup.aldm`) with SD-1.5's UNet (frozen, bf16
compute, rematerialised blocks), its ControlNet (class-embedding layout at
1/4 size, 768-wide CLIP vectors; trainable, AdamW, EMA), SD's VAE decoder
(with gradient, rematerialised, bf16), CLIP ViT-L/14's text transformer and
an UperNet + ResNet-50 segmenter with 150 + 1 classes (trainable, AdamW), at
512x512, batch 4 per device, n_lazy 8, K 9 on a 25-step grid, on a fake
8-device FSDP mesh (data=1, fsdp=8). Every input is a ShapeDtypeStruct.

Reported: XLA's memory analysis (arguments = this device's shard of the
train state and frozen weights; temporaries = activations, gathered weights
and everything else live at the peak) and cost analysis (FLOPs per step on
one device; both branches of the lazy `cond` are in the program, so this is
an upper bound of a plain step and a lower bound of a lazy one).

Extrapolation to a 256-chip pod at batch 4 per chip: the per-chip shard of
every state/frozen leaf is recomputed exactly for each (data, fsdp)
factorisation of 256 chips with fsdp >= 8 (the batch over data x fsdp, the
weights sharded over fsdp by the same rules; a leaf none of whose sharded
dimensions the fsdp size divides stays replicated, as SD's 320- and
640-channel layers do at fsdp=256), and the least is taken: data=4 x
fsdp=64 (0.16 GiB per chip, against 1.11 at fsdp=256). The temporaries are
taken as measured at fsdp=8 with the same per-device batch (FSDP gathers
each layer's weights whole, so they do not shrink with more chips). XLA:CPU's
fusion and layouts differ from TPU/GPU, so this is an estimate, not a TPU
measurement.

Batch 4 per device runs as 4 micro-batches of 1 (`control.micro_batches`),
with the discriminator's blocks and the VAE decoder's layers rematerialised.
XLA's FLOP count takes every loop body once: one micro-batch, and one of the
K unrolled DDIM steps, so `tflops_per_device_step` is a lower bound.

What the measurement does not see, measured on this machine:
  * XLA:CPU drops rematerialisation: it expands the optimisation barriers
    `jax.checkpoint` leaves and CSE merges the recomputation back into the
    forward pass (a 20-layer chain compiles to identical FLOPs and
    temporaries with and without `jax.checkpoint`; under `lax.scan` remat
    does cut them, 3.25 GiB -> 0.75 GiB). TPU and GPU keep the barriers, so
    the temporaries here are those of the step without remat.
  * XLA:CPU has no bfloat16 convolutions: it converts each bf16 weight back
    to float32 for them and keeps those copies alive into the backward pass
    (SD-1.5's UNet alone, gradient at 64x64 latents, batch 1: 7.56 GiB of
    temporaries with bf16 compute, 4.31 GiB with float32). SDSUP_SCALE_DTYPE=
    float32 compiles the step with float32 compute for comparison. In the
    buffer report of the current step, 6.4 GiB of the 17.1 GiB live at the
    peak are such float32 copies (`convert_convert` fusions).
  * The SPMD partitioner follows FSDP-sharded weights into the layers: with
    the VAE's weights left sharded, XLA's buffer report showed the decoder's
    [8, 512, 512, 256] activations (2 GiB each, the whole micro-batch) and
    its upsampler's [8, 257, 257, 1024] phase outputs all-gathered on every
    device (20.21 GiB per chip). The step now gathers the VAE's 83M weights
    before use (`sharding.gathered`): 16.98 GiB; and the segmenter's 64M:
    15.87 -> 15.35 GiB of temporaries; gathered inside the lazy branch only
    (plain steps do not use it): 15.11. The UNet's activations are still
    gathered for the whole micro-batch; gathering each layer's weights
    instead (inside its remat block) measured worse here (UNet gradient,
    batch 8 on fsdp=8: 9.44 GiB against 5.95), since XLA:CPU keeps every
    gathered weight alive into the backward pass. Batch-axis sharding
    constraints on every block output inside the models were tried instead
    and measured worse (22.93 GiB), so they are not in the models.

Runs in a child process: the 8 fake devices must be set before jax starts.
"""

import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_DEVICE_BATCH = 4
# Gradient accumulation over 4 micro-batches: 1 example per device at a time
# (measured: 90.25 GiB per chip with 1 micro-batch, 29.71 with 4).
MICRO_BATCHES = 4
FAKE_DEVICES = 8
POD_CHIPS = 256
GOAL_GIB = 16.0
COMPUTE_DTYPE = os.environ.get("SDSUP_SCALE_DTYPE", "bfloat16")


def _config():
    from sdsup import config_lib

    c = config_lib.load(os.path.join(ROOT, "configs", "scenes.py"))
    with c.unlocked():
        c.data.image_size = 512
        c.text.max_length = 77
        c.control.update(batch_size=PER_DEVICE_BATCH * FAKE_DEVICES, micro_batches=MICRO_BATCHES, n_lazy=8, grid_steps=25,
                         unroll_steps=9, lambda_adv=0.5, lambda_fake=0.001)
        # UperNet + ResNet-50 (transformers' UperNet defaults).
        c.discriminator.model = dict(embedding_size=64, hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3),
                                     layer_type="bottleneck", head_channels=512, pool_scales=(1, 2, 3, 6))
        c.control.remat_discriminator = True
        c.control.discriminator_dtype = COMPUTE_DTYPE
        c.control.hint_channels = ()  # the encoding's default hint encoder (ALDM's), not the scenes' narrow one
        c.fast_compile = True  # memory and FLOPs come from HLO passes; LLVM's effort does not change them
    return c


class _MeshShape:
    """Just enough of a Mesh for `sharding.fit_spec`: axis sizes of a pod we do not have."""

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


def _build(mesh):
    """(config, setup, boxed train state, boxed frozen weights, class table) of the SD-1.5 control step."""
    import jax
    import numpy as np

    from sdsup import aldm
    from sdsup.data import registry, tokenizers
    from sdsup.models import clip_text, unet, vae

    config = _config()
    num_classes = 150  # ADE20K
    spec = registry.DatasetSpec(
        name="ade20k_sized", class_names=tuple(f"class{i}" for i in range(num_classes)),
        palette=tuple((i, i, i) for i in range(num_classes)), ignore_id=255, caption_source="field:caption",
        make_builder=None, builds_offline=False, default_tokenizer="clip")
    tok = tokenizers.WordTokenizer.scenes(77)  # only the empty prompt's ids are used; shapes are what matter
    unet_config = unet.UNetConfig(**{**unet.STABLE_DIFFUSION_1_5.__dict__, "dtype": COMPUTE_DTYPE, "remat": True})
    vae_config = vae.VAEConfig(**{**vae.STABLE_DIFFUSION_1_5.__dict__, "dtype": COMPUTE_DTYPE, "remat": True})
    text_config = clip_text.CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768,
                                           num_hidden_layers=12, num_attention_heads=12)
    with config.unlocked():  # the stage reads the VAE's downsampling from the config
        config.vae.model = {k: v for k, v in vae_config.__dict__.items() if k != "sample_size"}
    table = np.zeros((num_classes, text_config.hidden_size), np.float32)
    setup = aldm.Setup(config, spec, tok, unet_config, vae_config, text_config, table, mesh)
    boxed_state = jax.eval_shape(setup.init, jax.random.PRNGKey(0))
    boxed_frozen = {name: jax.eval_shape(init) for name, init in setup.frozen_inits().items()}
    return config, setup, boxed_state, boxed_frozen, table


def pod_meshes():
    """Every (data, fsdp) factorisation of the pod, fsdp >= the fake mesh's: per-chip state bytes differ.

    FSDP leaves a leaf replicated where the fsdp size divides none of its
    sharded dimensions (SD's 320- and 640-channel layers at fsdp=256), so a
    hybrid mesh (fsdp within groups of chips, data across them) can hold
    less per chip than fsdp over the whole pod.
    """
    out, f = [], FAKE_DEVICES
    while f <= POD_CHIPS:
        out.append(_MeshShape(data=POD_CHIPS // f, fsdp=f))
        f *= 2
    return out


def child() -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sdsup import parallel, stages
    from sdsup.stages import common
    from sdsup.trainer import sharding

    mesh = parallel.make_mesh({"data": 1, "fsdp": FAKE_DEVICES})
    config, setup, boxed_state, boxed_frozen, table = _build(mesh)
    ctx = stages.Context(config=config, workdir=None, mesh=mesh)
    state_shardings = sharding.logical_shardings(boxed_state, mesh)
    state = sharding.sharded_abstract(boxed_state, mesh)
    frozen = setup.abstract_frozen(mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
    batch = common.abstract_batch(ctx, config.control.batch_size)

    start = time.perf_counter()
    lowered = setup.step(state_shardings).lower(state, batch, rng, frozen)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=common.compiler_options(ctx))
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    flops = float(analysis.get("flops", 0.0)) if analysis else None

    gib = 2.0 ** 30
    boxed_all = {"state": boxed_state, "frozen": boxed_frozen}
    # Temporaries depend on the per-device batch, not on the mesh's shape (each layer's weights are gathered
    # whole either way), so the pod's layout is the factorisation holding the least state per chip.
    args_by_mesh = {f"data{m.shape['data']}_fsdp{m.shape['fsdp']}": _shard_bytes(boxed_all, m) + table.nbytes
                    for m in pod_meshes()}
    pod_mesh = min(args_by_mesh, key=args_by_mesh.get)
    args_pod = args_by_mesh[pod_mesh]
    args_eight = args_by_mesh[f"data{POD_CHIPS // FAKE_DEVICES}_fsdp{FAKE_DEVICES}"]  # data does not shard state
    temp = mem.temp_size_in_bytes
    total_pod = args_pod + temp
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))
    return {
        "name": "sd15_aldm_step_on_paper", "value": round(total_pod / gib, 2), "unit": "GiB per chip (256 chips)",
        "goal": f"value <= {GOAL_GIB}",
        "config": "SD-1.5 UNet (frozen) + ControlNet (class embedding) + SD VAE decoder (grad, remat) + "
                  f"UperNet-R50 (151 classes) + CLIP ViT-L text, 512x512, 4 per device, n_lazy 8, K 9, {COMPUTE_DTYPE} compute",
        "fake_mesh": {"data": 1, "fsdp": FAKE_DEVICES},
        "per_device_fsdp8_gib": {"arguments": round(mem.argument_size_in_bytes / gib, 2),
                                 "arguments_from_rules": round(args_eight / gib, 2),
                                 "temporaries": round(temp / gib, 2), "outputs": round(mem.output_size_in_bytes / gib, 2),
                                 "aliased": round(mem.alias_size_in_bytes / gib, 2)},
        "per_chip_256_gib": {"mesh": pod_mesh, "arguments": round(args_pod / gib, 3), "temporaries": round(temp / gib, 2),
                             "arguments_by_mesh": {k: round(v / gib, 3) for k, v in args_by_mesh.items()}},
        "tflops_per_device_step": round(flops / 1e12, 2) if flops else None,
        "parameters_millions": {"trainable_controlnet": round(count(boxed_state["gen"]["params"]) / 1e6, 1),
                                "trainable_segmenter": round(count(boxed_state["seg"]["params"]) / 1e6, 1),
                                "frozen": {k: round(count(v) / 1e6, 1) for k, v in boxed_frozen.items()}},
        "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
    }


def sd15_aldm_step_on_paper() -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={FAKE_DEVICES}",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env, capture_output=True,
                          text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


BENCHMARKS = {"sd15_aldm_step_on_paper": sd15_aldm_step_on_paper}

if __name__ == "__main__" and "--child" in sys.argv:
    print(json.dumps(child()), flush=True)
