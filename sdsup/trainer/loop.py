"""The train loop shared by every stage.

A stage supplies a compiled step `(state, batch, rng) -> (state, metrics)`,
its initial sharded state, and a factory for its batches; the loop owns
resuming, checkpoints, metrics, progress, divergence checks and preemption.

Determinism: the step's rng is `fold_in(rng, step)`, the data iterator's
state is checkpointed with the model, and nothing else is random, so a run
stopped at step N and resumed continues bitwise identically (on the same
mesh and hardware).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from sdsup import viz
from sdsup.errors import SdsupError
from sdsup.trainer import checkpoint, preemption
from sdsup.trainer.checkpoint import Checkpointer, abstract_like

# Peak dense bf16 TFLOP/s per device, for MFU. Unknown devices (CPU) report
# achieved FLOP/s only, unless the config gives `peak_tflops`.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
}


class TrainingDiverged(SdsupError):
    """A loss term became NaN or Inf."""


# Raised by the loop after saving on SIGTERM; the CLI exits with preemption.RETRY_EXIT_STATUS.
Preempted = preemption.Preempted


def check_finite(name: str, step: int, metrics: Dict[str, Any], last_good: Optional[int]) -> None:
    values = jax.device_get(metrics)
    for key in sorted(values):
        value = np.asarray(values[key])
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise TrainingDiverged(
                f"stage {name}: {key} is {value.tolist()} at step {step}; training stopped. "
                f"The last good checkpoint (step {last_good}) is intact.")


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    if override:
        return float(override)
    return PEAK_TFLOPS.get(jax.devices()[0].device_kind)


def step_flops(compiled) -> Optional[float]:
    """FLOPs of one step on one device, from XLA's cost analysis."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends have none
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def run(*, name: str, stage_dir: str, state: Any, shardings: Any, step_fn: Callable,
        make_batches: Callable[[Optional[dict]], Iterator], rng: jax.Array, num_steps: int,
        log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: int = 3,
        config: Optional[dict] = None, batch_size: Optional[int] = None, flops_per_step: Optional[float] = None,
        peak_tflops: Optional[float] = None, hooks: Sequence[Callable[[int, Any], None]] = (),
        hook_every: int = 0, asynchronous_checkpoints: bool = True,
        pictures: Optional[Callable[[int, Any], np.ndarray]] = None, picture_every: int = 0,
        learning_rates: Optional[Dict[str, Callable[[int], Any]]] = None) -> Any:
    """Trains to `num_steps` (resuming from the stage's latest checkpoint); returns the state.

    `learning_rates` maps a metric name ("lr", "lr/seg") to the optax
    schedule of an optimiser, logged with the other scalars.
    `pictures(step, state)` returns an RGB uint8 image [H, W, 3] (a sample
    grid); every `picture_every` steps it goes to TensorBoard
    and to `stage_dir/samples/step_NNNNNN.png`. Every process calls it (it may
    run collectives); process 0 writes.

    Raises Preempted after saving when SIGTERM arrives, TrainingDiverged when a
    metric becomes non-finite (without saving the bad state).
    """
    # From here on SIGTERM means: save after this step, then stop; a full disk is one clear error.
    with preemption.deferred() as sigterm, _disk_full_as_one_error(name, stage_dir):
        ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), keep_checkpoints, asynchronous_checkpoints)
        start, data_state = 0, None
        if ckpt.latest_step() is not None:
            # The newest intact checkpoint: unreadable newer ones are skipped with a warning (checkpoint.py).
            state, data_state, start = ckpt.restore(abstract_like(state, shardings))
            logging.info("%s: resumed from step %d", name, start)
        if start >= num_steps:
            ckpt.close()
            return state
        batches = make_batches(data_state or None)
        writer = metric_writers.create_default_writer(stage_dir, just_logging=jax.process_index() > 0)
        report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_steps=log_every)
        peak = device_peak_tflops(peak_tflops)
        last_good = start if start else None
        pending = None  # (step, metrics): checked one step late so the device never waits on the host
        timer_steps, timer_start = 0, time.perf_counter()
        try:
            for step in range(start + 1, num_steps + 1):
                batch = next(batches)
                state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
                if pending is not None:
                    check_finite(name, *pending, last_good)
                pending = (step, metrics)
                report(step)
                timer_steps += 1
                if step % log_every == 0 or step == num_steps:
                    check_finite(name, step, metrics, last_good)
                    seconds = time.perf_counter() - timer_start
                    scalars = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()
                               if np.asarray(v).ndim == 0}
                    for lr_name, schedule in (learning_rates or {}).items():
                        # The update of step N used the schedule's value at count N - 1.
                        scalars[lr_name] = float(schedule(step - 1))
                    steps_per_sec = timer_steps / max(seconds, 1e-9)
                    scalars["perf/steps_per_sec"] = steps_per_sec
                    if batch_size:
                        scalars["perf/examples_per_sec"] = steps_per_sec * batch_size
                    if flops_per_step:
                        tflops = flops_per_step * steps_per_sec / 1e12
                        scalars["perf/tflops_per_device"] = tflops
                        if peak:
                            scalars["perf/mfu"] = tflops / peak
                    writer.write_scalars(step, scalars)
                    timer_steps, timer_start = 0, time.perf_counter()
                preempted = sigterm.raised or ckpt_reached_preemption(ckpt, step)
                if step % checkpoint_every == 0 or step == num_steps or preempted:
                    check_finite(name, step, metrics, last_good)
                    ckpt.save(step, state, batches.get_state(), config)
                    last_good = step
                if preempted:  # before hooks and pictures: a preemption notice leaves little time
                    ckpt.wait()
                    raise Preempted(f"{name}: stopped at step {step} on SIGTERM; checkpoint saved")
                if hook_every and (step % hook_every == 0 or step == num_steps):
                    for hook in hooks:
                        hook(step, state)
                if pictures is not None and picture_every and step % picture_every == 0:
                    _write_picture(writer, stage_dir, step, pictures(step, state))
        finally:
            writer.flush()
            ckpt.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return state


@contextlib.contextmanager
def _disk_full_as_one_error(name: str, stage_dir: str):
    """"No space left on device" from any writer of the loop (TensorBoard's, a picture's) as a DiskFullError that
    says what is kept; a failed checkpoint write already says so (checkpoint.CheckpointWriteError)."""
    try:
        yield
    except SdsupError:
        raise
    except Exception as e:  # noqa: BLE001 - TensorFlow, PIL and orbax raise their own kinds
        if not checkpoint.is_disk_full(e):
            raise
        steps = checkpoint.complete_steps(os.path.join(stage_dir, "checkpoints"))
        kept = (f"its last complete checkpoint (step {steps[-1]}) is intact" if steps
                else "it has no complete checkpoint yet")
        raise checkpoint.DiskFullError(
            f"stage {name}: no space left on device under {stage_dir}; {kept}. "
            f"Free space, then run the same command again.") from e


def _write_picture(writer, stage_dir: str, step: int, image: np.ndarray) -> None:
    if jax.process_index() != 0:
        return
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a sample picture must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    writer.write_images(step, {"samples": image[None]})
    viz.save_png(image, os.path.join(stage_dir, "samples", f"step_{step:06d}.png"))


def ckpt_reached_preemption(ckpt: Checkpointer, step: int) -> bool:
    """Multi-host preemption notices (JAX's preemption service), agreed by all processes."""
    if jax.process_count() == 1:
        return False
    try:
        return bool(ckpt._manager.reached_preemption(step))
    except Exception:
        return False
