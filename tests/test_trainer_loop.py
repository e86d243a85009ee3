"""The shared train loop on a toy model: exact resume, divergence, preemption, re-meshing."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdsup import parallel
from sdsup.stages import common
from sdsup.trainer import checkpoint, loop, sharding
from toy_training import Batches, Toy, toy_setup


def _run(tmp_path, mesh, num_steps, poison_at=None, hooks=(), hook_every=0, pictures=None, picture_every=0,
         learning_rates=None):
    state, shardings, step = toy_setup(mesh)
    return loop.run(name="toy", stage_dir=str(tmp_path), state=state, shardings=shardings, step_fn=step,
                    make_batches=lambda s: Batches(mesh, s, poison_at), rng=jax.random.PRNGKey(1),
                    num_steps=num_steps, log_every=2, checkpoint_every=3, hooks=hooks, hook_every=hook_every,
                    config={"toy": True}, batch_size=8, asynchronous_checkpoints=True, pictures=pictures,
                    picture_every=picture_every, learning_rates=learning_rates)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_resumed_run_is_bitwise_identical(tmp_path):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    straight = _leaves(_run(tmp_path / "straight", mesh, 12))
    _run(tmp_path / "resumed", mesh, 6)
    resumed = _leaves(_run(tmp_path / "resumed", mesh, 12))
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed))
    assert (tmp_path / "resumed" / "checkpoints").exists()


def test_nan_stops_with_the_term_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    mesh = parallel.make_mesh({"data": -1})
    with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 8.*step 6\) is intact"):
        _run(tmp_path, mesh, 12, poison_at=8)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == 6
    state, shardings, _ = toy_setup(mesh)
    restored, data_state, step = ckpt.restore(checkpoint.abstract_like(state, shardings))
    assert step == 6 and data_state == {"next": 6}
    assert all(np.isfinite(x).all() for x in _leaves(restored))


def test_sigterm_saves_and_stops(tmp_path):
    mesh = parallel.make_mesh({"data": -1})

    def send_sigterm(step, state):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(loop.Preempted, match="step 5"):
        _run(tmp_path, mesh, 12, hooks=[send_sigterm], hook_every=1)
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 5
    finished = _leaves(_run(tmp_path, mesh, 12))
    straight = _leaves(_run(tmp_path / "straight", mesh, 12))
    assert all(np.array_equal(a, b) for a, b in zip(straight, finished))


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    eight = parallel.make_mesh({"data": -1})
    trained = _run(tmp_path, eight, 6)
    fsdp = parallel.make_mesh({"data": 2, "fsdp": 4})
    state, shardings, _ = toy_setup(fsdp)
    restored, _, _ = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).restore(
        checkpoint.abstract_like(state, shardings))
    for a, b in zip(_leaves(trained), _leaves(restored)):
        assert np.array_equal(a, b)
    kernel = restored["params"]["Dense_1"]["kernel"]  # (4, 16): 16 splits over fsdp=4
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), asynchronous=False)
    ckpt.save(1, {"w": jnp.zeros((32,))})
    ckpt.wait()
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"does not fit the state.*delete .*ckpt"):
        ckpt.restore({"w": jax.ShapeDtypeStruct((16,), jnp.float32)})
    ckpt.close()


def test_sample_pictures_go_to_png_files_and_tensorboard(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator

    mesh = parallel.make_mesh({"data": -1})
    seen = []

    def pictures(step, state):
        seen.append(step)
        image = np.zeros((6, 10, 3), np.uint8)
        image[:, :step] = 255  # the step is visible in the picture
        return image

    _run(tmp_path, mesh, 9, pictures=pictures, picture_every=4)
    assert seen == [4, 8]
    for step in seen:
        png = np.asarray(Image.open(tmp_path / "samples" / f"step_{step:06d}.png"))
        assert png.shape == (6, 10, 3) and png[0, :step].min() == 255 and png[0, step:].max() == 0
    events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    logged = [e.step for e in events.Tensors("samples")] if "samples" in tags.get("tensors", []) else \
        [e.step for e in events.Images("samples")]
    assert logged == [4, 8]


def test_a_picture_of_the_wrong_kind_is_refused(tmp_path):
    mesh = parallel.make_mesh({"data": -1})
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]"):
        _run(tmp_path, mesh, 4, pictures=lambda step, state: np.zeros((4, 4), np.float32), picture_every=2)


def test_learning_rates_and_throughput_are_logged(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    mesh = parallel.make_mesh({"data": -1})
    _run(tmp_path, mesh, 6, learning_rates={"lr": lambda step: 0.5 * step, "lr/seg": lambda step: 1.0})
    events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    read = lambda tag: {e.step: float(np.asarray(tf_value(e))) for e in events.Tensors(tag)}
    # log_every=2: steps 2, 4, 6; the update of step N used the schedule at N - 1.
    assert read("lr") == {2: 0.5, 4: 1.5, 6: 2.5}
    assert read("lr/seg") == {2: 1.0, 4: 1.0, 6: 1.0}
    assert set(read("perf/steps_per_sec")) == {2, 4, 6} and set(read("perf/examples_per_sec")) == {2, 4, 6}
    assert all(v > 0 for v in read("perf/examples_per_sec").values())


def tf_value(event):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(event.tensor_proto)


def test_state_made_in_the_background_equals_the_direct_one():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    model, tx = Toy(), optax.adamw(1e-2)

    def init(rng):
        params = model.init(rng, jnp.zeros((1, 4)))["params"]
        return {"params": params, "opt": tx.init(params)}

    direct, shardings = sharding.create_sharded(init, mesh, jax.random.PRNGKey(0))

    def finish(state, shardings):
        state["params"] = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) + 1.0, s), state["params"],
                                       shardings["params"])
        return state

    pending, same_shardings = sharding.create_sharded_in_background(init, mesh, jax.random.PRNGKey(0),
                                                                    finish=finish)
    assert same_shardings == shardings
    # What compiling a step reads: shapes, dtypes and shardings, before the state exists.
    for a, x in zip(jax.tree.leaves(pending.abstract), jax.tree.leaves(direct)):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
    made = sharding.resolve(pending)
    for x, y in zip(jax.tree.leaves(made["params"]), jax.tree.leaves(direct["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y) + 1.0)
        assert x.sharding == y.sharding
    for x, y in zip(jax.tree.leaves(made["opt"]), jax.tree.leaves(direct["opt"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def broken(state, shardings):
        raise ValueError("no such checkpoint")

    pending, _ = sharding.create_sharded_in_background(init, mesh, jax.random.PRNGKey(0), finish=broken)
    with pytest.raises(ValueError, match="no such checkpoint"):
        sharding.resolve(pending)


def test_a_warmed_up_function_compiles_once_and_waits_for_the_warm_up():
    traces = []

    @jax.jit
    def sampler(params, x):
        traces.append(1)  # runs once per trace, i.e. per compile
        return x @ params["w"]

    abstract = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    x = np.ones((2, 4), np.float32)
    after = common.warm_up("toy sampler", lambda: sampler(common.zeros_like_abstract(abstract), x))
    got = after(sampler)({"w": np.full((4, 3), 2.0, np.float32)}, x)
    np.testing.assert_array_equal(np.asarray(got), np.full((2, 3), 8.0))
    assert len(traces) == 1  # the real weights (host arrays, same shapes) hit the warm-up's compile

    # A failing warm-up is only logged; the real call reports its own error.
    after = common.warm_up("broken", lambda: sampler({"w": np.ones((5, 3), np.float32)}, x))
    with pytest.raises(TypeError):
        after(sampler)({"w": np.ones((5, 3), np.float32)}, x)


def test_every_stage_has_its_own_random_streams():
    """Initialisation, data order and step noise differ between stages (layout and discriminator once shared them)."""
    import ml_collections

    ctx = common.Context(config=ml_collections.ConfigDict({"seed": 0}), workdir=None, mesh=None)
    keys = {(name, stream): tuple(np.asarray(jax.random.key_data(common.stage_key(ctx, name, stream))).ravel())
            for name in common.STAGE_IDS for stream in (common.INIT, common.DATA, common.STEPS)}
    assert len(set(keys.values())) == len(keys)
    seeds = {name: common.data_seed(ctx, name) for name in common.STAGE_IDS}
    assert len(set(seeds.values())) == len(seeds)
    assert common.data_seed(ctx, "layout") == common.data_seed(ctx, "layout")  # deterministic
