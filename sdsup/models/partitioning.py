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

from typing import Callable, Optional, Tuple

import flax.linen as nn

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
