"""The update step every stage shares: optimiser, gradients over micro-batches, clipping, EMA.

A stage gives a loss; `make_step` turns it into the jitted, sharded step
`(state, batch, rng, *frozen) -> (state, metrics)` that the train loop runs,
with the state a plain dict `{"params", "opt", "step"}` (+ `"ema"` with an
EMA decay, + a carried collection such as `"batch_stats"`). The ALDM step
(`sdsup.aldm`), which updates two networks in one step, builds on the same
pieces: `optimizer`, `scan_micro_batches`, `accumulate_gradients`,
`apply_gradients`, `ema_update`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax


def learning_rate(opt_cfg, num_steps: int) -> optax.Schedule:
    """The schedule `opt_cfg.schedule` names: "constant" (with warm-up), "warmup_cosine" or "one_cycle"."""
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


def apply_gradients(tx, params: Any, opt_state: Any, grads: Any) -> Tuple[Any, Any, jax.Array]:
    """(new params, new optimiser state, global gradient norm)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return params, opt_state, norm


def make_step(loss_fn: Callable, tx, shardings: Any, *, micro_batches: int = 1, ema_decay: Optional[float] = None,
              carried: Optional[str] = None) -> Callable:
    """The jitted step `(state, batch, rng, *frozen) -> (new state, metrics)` of one network.

    `loss_fn(params, batch, rng, *frozen) -> (loss, metrics)`; with `carried`
    (a state key such as "batch_stats", threaded through the micro-batches in
    order), `loss_fn(params, state[carried], batch, rng, *frozen) -> (loss,
    (new carried value, metrics))`. Gradients are averaged over
    `micro_batches`; the optimiser (with its clipping) applies them;
    `metrics["grad_norm"]` is the pre-clipping global norm. With `ema_decay`
    the state's "ema" follows the parameters (warm-up, see `ema_update`).
    The state is donated; `shardings` are the new state's.
    """
    def grads_and_metrics(params, value, mb, rng, frozen):
        if carried is None:
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, rng, *frozen)
            return value, (metrics, grads)
        (_, (value, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, value, mb, rng, *frozen)
        return value, (metrics, grads)

    def step(state, batch, rng, *frozen):
        value = state[carried] if carried is not None else ()
        value, (metrics, grads) = scan_micro_batches(
            lambda v, mb, r: grads_and_metrics(state["params"], v, mb, r, frozen), value, batch, rng, micro_batches)
        params, opt, metrics["grad_norm"] = apply_gradients(tx, state["params"], state["opt"], grads)
        new = {"params": params, "opt": opt, "step": state["step"] + 1}
        if carried is not None:
            new[carried] = value
        if ema_decay is not None:
            new["ema"] = ema_update(state["ema"], params, ema_decay, state["step"] + 1)
        return new, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))
