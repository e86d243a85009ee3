"""Which implementation each op of `sdsup.models.ops` runs, by JAX backend: the one place that decides.

Every op asks `use_cpu_kernels()` while it is traced. The hand-written
kernels exist because of how XLA compiles for CPU (a slow generic matmul for
operands contracted over their leading axis, no fusion of matmul and
softmax, single-threaded convolutions, temporaries mmapped afresh every
step), and every number that justifies them was measured on CPU against
PyTorch (bench/bench_unet.py). On GPU and TPU the ops are plain jnp/lax and
autodiff, which cuDNN / XLA's GPU and TPU emitters handle well, rather than
custom VJPs tuned for a machine they do not run on.

  op (module)                   cpu                                      gpu, tpu
  dense (ops.dense)             custom VJP: weight gradient as x^T @ dy   jnp.einsum, autodiff
                                with x transposed first (XLA:CPU runs
                                the untransposed form at ~60 GFLOP/s
                                against ~150)
  convolution (ops.conv)        `conv2d_cpu`: Winograd F(2x2, 3x3) for    lax.conv_general_dilated,
                                large stride-1 float32 3x3 convolutions   autodiff
                                (forward, input gradient); weight
                                gradient one matmul per kernel tap
                                (1.3-3x faster than XLA's, ~50x for the
                                upsampler's 2x2 kernel)
  group_norm (ops.norm)         custom VJP with the following SiLU fused  the same forward (same
                                in: one reduction pass and one            statistics), autodiff
                                elementwise pass each way (2.4 ms
                                against 9.5 ms for autodiff)
  attention "auto"              `chunked_attention` from 256x256 scores   "xla": softmax(q k^T) v
  (ops.attention)               per head (scores kept in cache, backward  as plain einsums,
                                recomputes them), plain einsums below     autodiff
  layer_norm (ops.norm)         plain jnp                                 the same
  upsample2x_conv3x3            the same on every backend: the 3x3 convolution of the 2x-upsampled
  (ops.upsample)                image as a 2x2 convolution on the low-resolution grid (16 instead of
                                36 multiply-adds per input pixel); an algorithm, not a CPU
                                workaround, and its convolution goes through `convolution` above

Explicit choices are honoured everywhere: `attention(..., "chunked")` runs
the chunked kernel on any backend (e.g. when the plain score matrix does not
fit in memory), and `conv2d_cpu` / `winograd_conv3x3` can be called directly.

The backend is `jax.default_backend()`, read at trace time: a function
traced for one backend and run on another keeps the choice made when it was
traced. Tests exercise the GPU/TPU formulation on CPU by replacing
`backend` (e.g. pytest's monkeypatch.setattr(dispatch, "backend", lambda: "tpu")).
"""

import jax

CPU = "cpu"


def backend() -> str:
    """The JAX backend the ops are traced for: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def use_cpu_kernels() -> bool:
    """Whether the ops take their hand-written CPU kernels (see the table above)."""
    return backend() == CPU
