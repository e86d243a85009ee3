"""The numerical kernels under `sdsup.models.layers`: pure functions on arrays, no parameters.

  ops.conv       `convolution` (its CPU formulation `conv2d_cpu`, Winograd 3x3)
  ops.dense      `dense`
  ops.norm       `group_norm` (optionally fused with SiLU), `layer_norm`
  ops.attention  `attention` ("auto", "chunked", "jax", "xla"), `chunked_attention`
  ops.upsample   `upsample_nearest`, `upsample2x_conv3x3`
  ops.dispatch   which implementation each of them runs on cpu / gpu / tpu, and why

Import the functions from their modules (`from sdsup.models.ops.attention
import attention`): the package re-exports nothing, because a function
re-exported here under its module's name (`attention`, `dense`) would hide
that module. Each module keeps the measurements that justify its kernels
next to them.
"""
