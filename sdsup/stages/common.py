"""What every training stage uses: the run's context, batches on the mesh, ahead-of-time compiles, the loop."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from sdsup import parallel, pipelines
from sdsup.data import dataset as dataset_lib
from sdsup.data import registry
from sdsup.trainer import loop, sharding, update
from sdsup.workdir import Workdir

# Rows of every sample grid. Evaluation batches of the same size reuse the grids' compiled samplers
# (configs/scenes.py:smoke evaluates 8 examples per split for exactly that reason).
GRID_ROWS = 8
# Each stage's random streams (initialisation, data order, step noise) come from the run's seed folded
# with the stage's number, so no two stages share a stream. Fixed numbers, not positions: a new stage
# must not change the others' streams.
STAGE_IDS = {"vae": 1, "ldm": 2, "layout": 3, "discriminator": 4, "control": 5, "evalseg": 6, "planner": 7}
INIT, DATA, STEPS = 0, 1, 2  # the streams of a stage


@dataclasses.dataclass
class Context:
    """One training run: its config, workdir and mesh, and what its stages share (dataset, tokenizer)."""

    config: Any  # ml_collections.ConfigDict
    workdir: Workdir
    mesh: jax.sharding.Mesh
    compile_seconds: float = 0.0  # the current stage's ahead-of-time compiles, for its DONE.json
    _tokenizer: Any = None
    _dataset: Optional[dataset_lib.Dataset] = None

    def stage_dir(self, name: str) -> str:
        return self.workdir.stage_dir(name, create=True)

    @property
    def spec(self) -> registry.DatasetSpec:
        return registry.for_config(self.config.data)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = dataset_lib.text_tokenizer(self.config)
        return self._tokenizer

    @property
    def dataset(self) -> dataset_lib.Dataset:
        """The config's dataset, built on first use (once per run) and shared by the stages."""
        if self._dataset is None:
            self._dataset = dataset_lib.Dataset.open(self.config, self.tokenizer)
        return self._dataset

    def derived(self, config, workdir: Workdir) -> "Context":
        """A context for another config and workdir over the same data and mesh (the ablation's variants)."""
        return dataclasses.replace(self, config=config, workdir=workdir, compile_seconds=0.0)

    def sampling(self) -> pipelines.Settings:
        """The config's generation settings (pictures during training use them)."""
        return pipelines.Settings.from_config(self.config, self.tokenizer, self.spec)


def stage_key(ctx: Context, name: str, stream: int) -> jax.Array:
    """Stream `stream` (INIT, DATA or STEPS) of stage `name`: fold_in(fold_in(PRNGKey(seed), stage), stream)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(ctx.config.seed), STAGE_IDS[name]), stream)


def init_rng(ctx: Context, name: str) -> jax.Array:
    """The key that initialises stage `name`'s networks."""
    return stage_key(ctx, name, INIT)


def data_seed(ctx: Context, name: str) -> int:
    """Stage `name`'s data order: grain's integer seed, drawn from the stage's DATA stream."""
    return int(jax.random.randint(stage_key(ctx, name, DATA), (), 0, 2 ** 31 - 1))


def train_batches(ctx: Context, seed: int, data_state: Optional[dict] = None,
                  global_batch_size: Optional[int] = None, source=None, derive=None) -> parallel.DevicePrefetch:
    """Global training batches on the mesh, resumable from `data_state`; from `source` (e.g. a
    `latent_cache.CachedSource`) instead of the train split's records where given; `derive` adds
    fields computed from each example (`pipeline.Preprocess.derive`)."""
    inp = ctx.config.input
    ds = ctx.dataset.train_dataset(global_batch_size=global_batch_size or inp.batch_size, seed=seed, flip=inp.flip,
                                   num_threads=inp.num_threads, prefetch=inp.prefetch,
                                   num_workers=inp.get("num_workers", 0), source=source, derive=derive)
    it = iter(ds)
    if data_state:
        it.set_state(data_state)
    return parallel.DevicePrefetch(it, ctx.mesh, inp.device_prefetch)


def abstract_batch(ctx: Context, batch_size: int, shapes: Optional[dict] = None) -> dict:
    """Shapes, dtypes and shardings of a training batch, for ahead-of-time compiles; `shapes` ({name: (shape,
    dtype)}) replaces the default image / label / tokens."""
    s, length = ctx.config.data.image_size, ctx.config.text.max_length
    shapes = shapes or {"image": ((batch_size, s, s, 3), jnp.uint8), "label": ((batch_size, s, s), jnp.uint8),
                        "tokens": ((batch_size, length), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(ctx.mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def compiler_options(ctx: Context) -> dict:
    return sharding.compiler_options(ctx.config)


def jit(fn: Callable, ctx: Context, **kwargs) -> Callable:
    """`jax.jit` with the run's compiler options."""
    return jax.jit(fn, compiler_options=compiler_options(ctx) or None, **kwargs)


def compile_step(step: Callable, state: Any, ctx: Context, batch_size: int, *frozen: Any,
                 batch_shapes: Optional[dict] = None):
    """The step compiled ahead of time (`.lower(...).compile()`) for this mesh.

    `step(state, batch, rng, *frozen)`; the frozen inputs (weights of models
    that do not train in this stage) are bound here, so the result has the
    loop's signature `(state, batch, rng)`. The per-step rng is placed
    replicated on the mesh, as the compiled executable expects. `state` may
    still be in the making (`sharding.PendingState`): only its shapes and
    shardings are read.
    """
    replicated = NamedSharding(ctx.mesh, P())
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    start = time.perf_counter()
    if isinstance(state, sharding.PendingState):
        state = state.abstract
    compiled = step.lower(state, abstract_batch(ctx, batch_size, batch_shapes), rng, *frozen).compile(
        compiler_options=compiler_options(ctx) or None)
    seconds = time.perf_counter() - start
    logging.info("train step compiled in %.1f s", seconds)
    # The stage's summary (DONE.json) reports it: compiles are a large part of short runs.
    ctx.compile_seconds += seconds

    def call(state, batch, rng):
        return compiled(state, batch, jax.device_put(rng, replicated), *frozen)

    call.compiled = compiled
    call.cost_analysis = compiled.cost_analysis
    return call


def zeros_like_abstract(tree: Any) -> Any:
    """Host zeros with the shapes and dtypes of a tree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)


def warm_up(what: str, fn: Callable[[], Any]) -> Callable:
    """Runs `fn()` in a background thread now; returns `after(f)`, which wraps `f` to wait for it first.

    For sample grids: `fn` draws a grid from placeholder weights of the
    trained ones' shapes, so the sampler compiles while the train step does
    (two compiles share the 2 cores better than they run one after the
    other) and the real grids find it in the pipelines' sampler cache: same
    shapes, dtypes and host placement. A failure here is only logged: the
    real call compiles again and raises for itself.
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


def create_state(ctx: Context, name: str, init: Callable, finish: Optional[Callable] = None):
    """(pending state, shardings) of stage `name`: `init(rng)` sharded on the mesh, made in the background."""
    return sharding.create_sharded_in_background(init, ctx.mesh, init_rng(ctx, name), finish=finish)


def start_from(key: str, params: Any) -> Callable:
    """A `create_state` finish that sets state["params"][key] and state["ema"][key] to copies of `params`
    (e.g. a stage's own trainable copy of an earlier stage's text encoder); separate buffers, because the
    step donates params and EMA."""
    def finish(state, shardings):
        for part in ("params", "ema"):
            state[part][key] = jax.tree.map(lambda x, sh: jax.device_put(np.array(x), sh), params,
                                            shardings[part][key])
        return state
    return finish


def train(ctx: Context, name: str, cfg, state: Any, shardings: Any, step_fn: Callable,
          pictures: Optional[Callable] = None, learning_rates: Optional[dict] = None, source=None, derive=None):
    """Runs the shared loop for stage `name` with its config section `cfg`.

    The data order and the step rngs come from the stage's own streams
    (`stage_key`). `pictures(step, state)` (a sample grid) runs every
    `cfg.sample_every` steps when set. `learning_rates` ({metric name: step ->
    lr}) defaults to the schedule of `cfg.optimizer`. `state` may be a
    `sharding.PendingState`. `source` and `derive`: see `train_batches`.
    """
    state = sharding.resolve(state)
    seed = data_seed(ctx, name)
    batches = lambda data_state: train_batches(ctx, seed=seed, data_state=data_state, global_batch_size=cfg.batch_size,
                                               source=source, derive=derive)
    return loop.run(
        name=name, stage_dir=ctx.stage_dir(name), state=state, shardings=shardings, step_fn=step_fn,
        make_batches=batches, rng=stage_key(ctx, name, STEPS), num_steps=cfg.num_steps,
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
        config=ctx.config.to_dict(), batch_size=cfg.batch_size, flops_per_step=loop.step_flops(step_fn),
        peak_tflops=ctx.config.get("peak_tflops"), pictures=pictures, picture_every=int(cfg.get("sample_every", 0)),
        learning_rates=learning_rates or {"lr": update.learning_rate(cfg.optimizer, cfg.num_steps)})
