"""Parameter and optimiser-state sharding from logical axis names.

Models create parameters with logical names (`sdsup.models.partitioning`).
Optimiser states made by optax from *boxed* parameters keep those boxes, so
one `nn.get_partition_spec` over the whole train state gives a logical spec
for every leaf. Rules map logical names to mesh axes; a dimension that the
mesh axes do not divide falls back to replication (a 4-channel conv_out on an
8-way FSDP mesh, say), so one rule set fits every model and mesh.

`create_sharded` builds a state directly in its sharded layout: shapes come
from `jax.eval_shape`, and the jitted initialiser writes each shard on its
device, so no host or device ever holds the whole state (diffusers #5849).
`create_sharded_in_background` does the same in a thread and hands back the
shapes at once, so that a stage compiles its step while the state is made.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdsup.models.partitioning import FSDP_RULES

Rules = Sequence[Tuple[str, Any]]


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def fit_spec(spec: P, shape: Tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with every mesh axis that does not divide its dimension dropped."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, axes in zip(shape, entries):
        fitted.append(axes if axes is None or dim % _axis_size(mesh, axes) == 0 else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def logical_specs(abstract_boxed: Any, mesh: Mesh, rules: Rules = FSDP_RULES) -> Any:
    """Mesh PartitionSpecs for a (possibly boxed) abstract tree; unboxed leaves replicate.

    Only `mesh.shape` is read, so a stand-in with the axis sizes of a mesh one
    does not have (a 256-chip pod, for memory estimates) works too.
    """
    logical = nn.get_partition_spec(abstract_boxed)
    unboxed = nn.meta.unbox(abstract_boxed)

    def one(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
        return fit_spec(mesh_spec, leaf.shape, mesh)

    return jax.tree.map(one, logical, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules = FSDP_RULES) -> Any:
    """NamedShardings for a (possibly boxed) abstract tree; unboxed leaves replicate."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), logical_specs(abstract_boxed, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def sharded_abstract(abstract_boxed: Any, mesh: Mesh, rules: Rules = FSDP_RULES) -> Any:
    """Unboxed ShapeDtypeStructs carrying the shardings the logical axis names give: what lowering needs."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        nn.meta.unbox(abstract_boxed), logical_shardings(abstract_boxed, mesh, rules))


# XLA options that trade step speed for compile speed (about 30% shorter compiles on CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiler_options(config) -> dict:
    """XLA options of a run: `config.fast_compile` trades step speed for compile speed (about 2x faster
    compiles on CPU), right for smoke runs and tests, where compiling dominates."""
    return dict(FAST_COMPILE) if config.get("fast_compile", False) else {}


def _sharded_initialiser(init_fn: Callable, mesh: Mesh, args: tuple, rules: Rules,
                         compiler_options: Optional[dict]) -> Tuple[Callable, Any, Any]:
    """(jitted unboxing initialiser, abstract unboxed state with shardings, shardings)."""
    abstract = sharded_abstract(jax.eval_shape(init_fn, *args), mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    def init_unboxed(*a):
        return nn.meta.unbox(init_fn(*a))

    init = jax.jit(init_unboxed, out_shardings=shardings, compiler_options=compiler_options or None)
    return init, abstract, shardings


def create_sharded(init_fn: Callable, mesh: Mesh, *args, rules: Rules = FSDP_RULES,
                   compiler_options: Optional[dict] = FAST_COMPILE):
    """(state, shardings): `init_fn(*args)` evaluated straight into its sharding.

    `init_fn` may return boxed parameters (and optimiser states made from
    them); the result is unboxed. The initialisation runs once, so by default
    it is compiled for compile speed (`FAST_COMPILE`).
    """
    init, _, shardings = _sharded_initialiser(init_fn, mesh, args, rules, compiler_options)
    return init(*args), shardings


class PendingState:
    """A train state being created in a background thread (`create_sharded_in_background`).

    `abstract` (shapes, dtypes and shardings) is all that compiling a step
    needs; `result()` waits for the state itself and re-raises any error of
    its creation.
    """

    def __init__(self, future: concurrent.futures.Future, abstract: Any):
        self._future = future
        self.abstract = abstract

    def result(self) -> Any:
        return self._future.result()


def create_sharded_in_background(init_fn: Callable, mesh: Mesh, *args, finish: Optional[Callable] = None,
                                 rules: Rules = FSDP_RULES, compiler_options: Optional[dict] = FAST_COMPILE):
    """(PendingState, shardings): `create_sharded`, compiled and run in a thread.

    The initialiser is a program of its own (every parameter's random
    initialiser: 5-10 s to compile for the scenes' UNet), and an XLA compile
    leaves part of a small machine idle, so the stage's step compiles
    meanwhile from `PendingState.abstract`. `finish(state, shardings)`, run in
    the same thread, returns the state with pretrained weights put in; it
    must keep every leaf's shape, dtype and sharding.
    """
    init, abstract, shardings = _sharded_initialiser(init_fn, mesh, args, rules, compiler_options)

    def create():
        state = init(*args)
        return finish(state, shardings) if finish is not None else state

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="init")
    future = executor.submit(create)
    executor.shutdown(wait=False)  # the thread ends with its one task
    return PendingState(future, abstract), shardings


def resolve(state: Any) -> Any:
    """The state itself, waiting for it if it is still being created."""
    return state.result() if isinstance(state, PendingState) else state


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def gathered(tree: Any, mesh: Optional[Mesh]) -> Any:
    """`tree` (inside a jitted step) whole on every device: FSDP's gather-before-use, said explicitly.

    For a model whose activations dwarf its weights (the VAE at image
    resolution), the SPMD partitioner may otherwise follow the sharded
    weights into the layers and all-gather the activations instead. Measured
    (SD's VAE decoder, gradient at 512x512, batch 8 on an 8-device fsdp mesh,
    per device): 9.63 GiB of temporaries with the weights left sharded, 3.12
    GiB gathered, the same as replicated weights; the stored shard is
    unchanged. No-op without a mesh.
    """
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def host_copy(tree: Any) -> Any:
    """The whole of a (possibly multi-process sharded) tree as host numpy arrays.

    Every process must call it: across processes the shards are gathered
    with a collective.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def place(init_fn: Callable, params: Any, mesh: Mesh) -> Any:
    """Loaded (host) parameters on the mesh, sharded as their model's logical axis names say.

    `init_fn()` returns the model's boxed params (only its shapes are traced).
    """
    shardings = logical_shardings(jax.eval_shape(init_fn), mesh)
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)
