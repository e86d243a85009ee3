"""Logical axis names that every sdsup parameter carries.

Models never mention mesh axes. Each parameter is created with logical names
(`flax.linen.with_logical_partitioning`); the trainer maps them to mesh axes
with short rules (for FSDP: shard `out_channels` over the `fsdp` axis, and
fall back to replication where a dimension does not divide). The vocabulary
is deliberately small so one rule set covers the UNet, the conditioner, the
VAE, the text encoder, the segmenter and the layout generator.

`model.init` returns boxed parameters (`nn.Partitioned`); conversion code and
anything that only needs values works on `nn.meta.unbox(params)`.
"""

import contextlib
import contextvars
import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import flax.linen as nn
import jax

KH, KW = "kernel_h", "kernel_w"
IN, OUT = "in_channels", "out_channels"
NORM = "norm"
VOCAB = "vocab"
POSITIONS = "positions"

CONV_KERNEL = (KH, KW, IN, OUT)  # HWIO
DENSE_KERNEL = (IN, OUT)
BIAS = (OUT,)
NORM_PARAM = (NORM,)
EMBEDDING = (VOCAB, OUT)
POSITION_EMBEDDING = (POSITIONS, OUT)

# Default rules for `nn.logical_axis_rules`: FSDP over output channels. The
# trainer may extend these (e.g. `in_channels` -> `tensor`).
FSDP_RULES: Tuple[Tuple[str, Optional[str]], ...] = (
    (KH, None),
    (KW, None),
    (IN, None),
    (OUT, "fsdp"),
    (NORM, None),
    (VOCAB, None),
    (POSITIONS, None),
)


def with_axes(init: Callable, names: Tuple[Optional[str], ...]) -> Callable:
    """An initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(init, names)


# Activations. With FSDP-sharded weights and nothing said about activations,
# XLA's SPMD partitioner may follow a weight's sharding into a layer and
# gather the whole (micro-)batch's activations on every device: measured for
# SD-1.5's VAE decoder and the UperNet segmenter at 512x512 (bench_scale.py),
# where [8, 512, 512, 256] float32 activations (2 GiB each) were all-gathered.
# Blocks call `constrain_batch` on their outputs; it pins the leading (batch)
# axis to the mesh's batch axes while a step is traced under
# `batch_sharded_activations`, and does nothing otherwise.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar("sdsup_activation_sharding", default=None)


@contextlib.contextmanager
def batch_sharded_activations(mesh: jax.sharding.Mesh, batch_axes: Sequence[str]) -> Iterator[None]:
    """While tracing under it, block outputs keep their batch axis split over `batch_axes` of `mesh`."""
    token = _ACTIVATION_SHARDING.set((mesh, tuple(batch_axes)))
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` [B, ...] with B split over the batch axes (see `batch_sharded_activations`); B must divide."""
    context = _ACTIVATION_SHARDING.get()
    if context is None:
        return x
    mesh, axes = context
    divisor = math.prod(mesh.shape[a] for a in axes)
    if divisor == 1 or x.ndim == 0 or x.shape[0] % divisor:
        return x  # nothing to split, or a batch that does not divide: left to the partitioner
    spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
