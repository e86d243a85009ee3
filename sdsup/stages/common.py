"""Pieces every training stage uses: batches, tokenizer, optimisers, EMA, accumulation."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sdsup import parallel, stages
from sdsup.data import pipeline, registry, tokenizers
from sdsup.trainer import sharding


def dataset(ctx: stages.Context):
    """(spec, builder) of the config's dataset, built if needed, shared by stages."""
    from sdsup.stages.data import prepare_dataset

    return prepare_dataset(ctx)


def tokenizer(ctx: stages.Context):
    if "tokenizer" not in ctx.cache:
        t = ctx.config.text
        ctx.cache["tokenizer"] = tokenizers.build(t.tokenizer, max_length=t.max_length, path=t.tokenizer_path)
    return ctx.cache["tokenizer"]


def train_batches(ctx: stages.Context, seed: int, data_state: Optional[dict] = None,
                  global_batch_size: Optional[int] = None) -> parallel.DevicePrefetch:
    """Global training batches on the mesh, resumable from `data_state`."""
    spec, builder = dataset(ctx)
    source = registry.data_source(spec, builder, "train")
    inp = ctx.config.input
    ds = pipeline.train_dataset(
        source, tokenizer=tokenizer(ctx), global_batch_size=global_batch_size or inp.batch_size, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count(), flip=inp.flip,
        caption_field=spec.caption_field, num_threads=inp.num_threads, prefetch=inp.prefetch)
    it = iter(ds)
    if data_state:
        it.set_state(data_state)
    return parallel.DevicePrefetch(it, ctx.mesh, inp.device_prefetch)


def learning_rate(opt_cfg, num_steps: int) -> optax.Schedule:
    lr, warmup = float(opt_cfg.lr), int(opt_cfg.get("warmup_steps", 0))
    kind = opt_cfg.get("schedule", "constant")
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]) \
            if warmup else optax.constant_schedule(lr)
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(num_steps, warmup + 1))
    if kind == "one_cycle":  # ALDM's segmenter schedule
        return optax.cosine_onecycle_schedule(max(num_steps, 2), lr)
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


def optimizer(opt_cfg, num_steps: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and the configured schedule."""
    schedule = learning_rate(opt_cfg, num_steps)
    parts = []
    if opt_cfg.get("grad_clip", 0):
        parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(opt_cfg.get("b1", 0.9)), b2=float(opt_cfg.get("b2", 0.999)),
                             eps=float(opt_cfg.get("eps", 1e-8)),
                             weight_decay=float(opt_cfg.get("weight_decay", 0.0))))
    return optax.chain(*parts), schedule


def ema_update(ema: Any, params: Any, decay: float, step: Optional[jax.Array] = None) -> Any:
    """One EMA step; with `step` (the optimiser steps taken so far, >= 1) the decay warms up.

    Warm-up: decay_t = min(decay, (1 + t) / (10 + t)). Without it the EMA of a
    short run keeps a visible share of the random initialisation (0.995^300 =
    22% after 300 steps); with it the first steps average quickly and the
    configured decay takes over after ~10 / (1 - decay) steps.
    """
    if step is not None:
        t = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)


def micro_batches(batch: dict, num: int) -> dict:
    """[B, ...] -> [num, B // num, ...] for `lax.scan` over micro-batches; micro-batch m = examples m, m+num, ...

    Strided, not contiguous: the batch is sharded over devices in contiguous
    blocks, so with B / devices a multiple of `num` every device holds its
    share of every micro-batch and the scan runs on all devices at once. (A
    contiguous split would put micro-batch m on a few devices only, and XLA
    would move data, or compute redundantly, in each iteration.)
    """
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch of {x.shape[0]} does not split into {num} micro-batches")
        return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def scan_micro_batches(fn: Callable, carry: Any, batch: dict, rng: jax.Array, num_micro: int) -> Tuple[Any, Any]:
    """(final carry, mean of outputs) of `fn(carry, micro_batch, rng) -> (carry, outputs)` over micro-batches.

    With num_micro == 1 it is a plain call on the whole batch; otherwise a
    `lax.scan` keeps one micro-batch's activations alive at a time, threads
    the carry (e.g. BatchNorm statistics) through them in order and averages
    the outputs (losses, gradients) with equal weights.
    """
    if num_micro == 1:
        return fn(carry, batch, rng)
    micro = micro_batches(batch, num_micro)
    _, out0 = jax.eval_shape(fn, carry, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out0)

    def body(acc, xs):
        carry, total = acc
        mb, i = xs
        carry, out = fn(carry, mb, jax.random.fold_in(rng, i))
        return (carry, jax.tree.map(lambda a, b: a + b / num_micro, total, out)), None

    (carry, mean), _ = jax.lax.scan(body, (carry, zeros), (micro, jnp.arange(num_micro)))
    return carry, mean


def accumulate_gradients(loss_and_grad: Callable, params: Any, batch: dict, rng: jax.Array,
                         num_micro: int) -> Tuple[Any, Any]:
    """Mean of (aux, grads) of `loss_and_grad(params, micro_batch, rng)` over micro-batches."""
    _, out = scan_micro_batches(lambda carry, mb, r: (carry, loss_and_grad(params, mb, r)), (), batch, rng,
                                num_micro)
    return out


# Rows of every sample grid. Evaluation batches of the same size reuse the grids' compiled samplers
# (configs/scenes.py:smoke evaluates 8 examples per split for exactly that reason).
GRID_ROWS = 8
# Batch of the evaluations (layout_eval, evaluation.images): larger batches use the cores better.
EVAL_BATCH = 32


def images_to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def abstract_batch(ctx: stages.Context, batch_size: int) -> dict:
    """Shapes, dtypes and shardings of a training batch, for ahead-of-time compiles."""
    s, length = ctx.config.data.image_size, ctx.config.text.max_length
    shapes = {"image": ((batch_size, s, s, 3), jnp.uint8), "label": ((batch_size, s, s), jnp.uint8),
              "tokens": ((batch_size, length), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(ctx.mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


# XLA options that trade step speed for compile speed (about 2x faster
# compiles on CPU): right for smoke runs and tests, where compiling dominates.
FAST_COMPILE = sharding.FAST_COMPILE


def compiler_options(ctx: stages.Context) -> dict:
    return dict(FAST_COMPILE) if ctx.config.get("fast_compile", False) else {}


def jit(fn: Callable, ctx: stages.Context, **kwargs) -> Callable:
    """`jax.jit` with the run's compiler options."""
    return jax.jit(fn, compiler_options=compiler_options(ctx) or None, **kwargs)


def compile_step(step: Callable, state: Any, ctx: stages.Context, batch_size: int, *frozen: Any):
    """The step compiled ahead of time (`.lower(...).compile()`) for this mesh.

    `step(state, batch, rng, *frozen)`; the frozen inputs (weights of models
    that do not train in this stage) are bound here, so the result has the
    loop's signature `(state, batch, rng)`. The per-step rng is placed
    replicated on the mesh, as the compiled executable expects. `state` may
    still be in the making (`sharding.PendingState`): only its shapes and
    shardings are read.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(ctx.mesh, P())
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    start = time.perf_counter()
    if isinstance(state, sharding.PendingState):
        state = state.abstract
    compiled = step.lower(state, abstract_batch(ctx, batch_size), rng, *frozen).compile(
        compiler_options=compiler_options(ctx) or None)
    seconds = time.perf_counter() - start
    logging.info("train step compiled in %.1f s", seconds)
    # The stage's summary (DONE.json) reports it: compiles are a large part of short runs.
    ctx.cache["compile_s"] = ctx.cache.get("compile_s", 0.0) + seconds

    def call(state, batch, rng):
        return compiled(state, batch, jax.device_put(rng, replicated), *frozen)

    call.compiled = compiled
    call.cost_analysis = compiled.cost_analysis
    return call


def place(init_fn: Callable, params: Any, mesh) -> Any:
    """Puts loaded (host) parameters on the mesh with the shardings their model's
    logical axis names give; `init_fn()` returns the model's boxed params."""

    shardings = sharding.logical_shardings(jax.eval_shape(init_fn), mesh)
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)


def zeros_like_abstract(tree: Any) -> Any:
    """Host zeros with the shapes and dtypes of a tree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)


def warm_up(what: str, fn: Callable[[], Any]) -> Callable:
    """Runs `fn()` in a background thread now; returns `after(f)`, which wraps `f` to wait for it first.

    For sample grids: `fn` draws a grid from placeholder weights of the
    trained ones' shapes, so the sampler compiles while the train step does
    (two compiles share the 2 cores better than they run one after the
    other) and the real grids find it in jit's cache: same shapes, dtypes
    and host placement. A failure here is only logged: the real call
    compiles again and raises for itself.
    """
    def run():
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported by the real call
            logging.warning("%s: warm-up failed (%s: %s); it compiles on first use", what, type(e).__name__, e)
        else:
            logging.info("%s: compiled in the background in %.1f s", what, time.perf_counter() - start)

    thread = threading.Thread(target=run, name=f"warm-up {what}", daemon=True)
    thread.start()

    def after(f: Callable) -> Callable:
        def waiting(*args, **kwargs):
            thread.join()  # a second compile of the same program would start otherwise
            return f(*args, **kwargs)
        return waiting
    return after


@contextlib.contextmanager
def timed(what: str):
    """Logs how long a block took (compiles and pictures are a large part of small runs)."""
    start = time.perf_counter()
    yield
    logging.info("%s took %.1f s", what, time.perf_counter() - start)


def apply_gradients(tx, params: Any, opt_state: Any, grads: Any) -> Tuple[Any, Any, jax.Array]:
    """(new params, new optimiser state, global gradient norm)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return params, opt_state, norm


def train(ctx: stages.Context, name: str, cfg, state: Any, shardings: Any, step_fn: Callable, seed_offset: int,
          pictures: Optional[Callable] = None, learning_rates: Optional[dict] = None):
    """Runs the shared loop for a stage with its config section `cfg`.

    The stage's data order and step rngs derive from `config.seed +
    seed_offset`, so stages never share random streams. `pictures(step,
    state)` (a sample grid) runs every `cfg.sample_every` steps when set.
    `learning_rates` ({metric name: step -> lr}) defaults to the schedule of
    `cfg.optimizer`. `state` may be a `sharding.PendingState`.
    """
    from sdsup.trainer import loop

    state = sharding.resolve(state)
    seed = ctx.config.seed + seed_offset
    batches = lambda data_state: train_batches(ctx, seed=seed, data_state=data_state,
                                               global_batch_size=cfg.batch_size)
    return loop.run(
        name=name, stage_dir=ctx.stage_dir(name), state=state, shardings=shardings, step_fn=step_fn,
        make_batches=batches, rng=jax.random.PRNGKey(seed + 1), num_steps=cfg.num_steps,
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
        config=ctx.config.to_dict(), batch_size=cfg.batch_size, flops_per_step=loop.step_flops(step_fn),
        peak_tflops=ctx.config.get("peak_tflops"), pictures=pictures, picture_every=int(cfg.get("sample_every", 0)),
        learning_rates=learning_rates or {"lr": learning_rate(cfg.optimizer, cfg.num_steps)})
