"""The ALDM control step is one program whatever the mesh: 1 device and 2 processes on data=2 x fsdp=2
(one process's data=2 x fsdp=4 is tests/test_control_mesh_extended.py, with the extended tests).

One step takes the lazy adversarial branch (decoder with gradient, unrolled
DDIM steps, segmenter update), the next the plain one; losses and every
updated leaf of the state (conditioner, its AdamW and EMA, segmenter and its
BatchNorm statistics) must agree within 1e-5.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import control_case
from sdsup import aldm, conditioning, parallel, stages
from sdsup.data import dataset
from sdsup.errors import ConfigError
from sdsup.models import io as model_io
from sdsup.models.segmenter import UperNetSegmenter
from sdsup.stages import common, control
from sdsup.trainer import loop, sharding
from sdsup.workdir import Workdir

TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Starts the 2-process x 2-device run at once, so that its compiles overlap this process's."""
    out = tmp_path_factory.mktemp("two_processes")
    port = _free_port()
    worker = os.path.join(os.path.dirname(__file__), "control_worker.py")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([control_case.ROOT, env.get("PYTHONPATH", "")])
    cache = jax.config.jax_compilation_cache_dir or str(out / "cache")
    # Output to files: XLA's warnings would fill a pipe nobody reads until the test runs.
    logs = [open(out / f"worker{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(out), cache], env=env,
                              stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    yield procs, out
    for p in procs:
        if p.poll() is None:
            p.kill()
    for log in logs:
        log.close()


@pytest.fixture(scope="module")
def one_device(two_processes):
    return control_case.run(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]), 3)


def _assert_same(history, states, ref_history, ref_states):
    assert len(history) == len(ref_history) and len(states) == len(ref_states)
    for step, (got, want) in enumerate(zip(history, ref_history)):
        assert got.keys() == want.keys()
        for key in want:
            assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (step, key, got[key], want[key])
    for step, (got, want) in enumerate(zip(states, ref_states)):
        assert got.keys() == want.keys()
        worst = max((float(np.max(np.abs(got[k] - want[k]))), k) for k in want if want[k].size)
        assert worst[0] <= TOL, (step, worst)


def test_lazy_then_plain_step_trains_both_networks(one_device):
    history, states = one_device
    assert history[0]["loss/adv"] > 0 and history[0]["loss/seg_real"] > 0  # step 0: lazy branch
    assert history[1]["loss/adv"] == history[0]["loss/adv"]  # step 1: plain, adversarial metrics carried over
    assert history[0]["loss"] == pytest.approx(history[0]["loss/noise"] + 0.5 * history[0]["loss/adv"], rel=1e-6)
    first, second = states[0], states[1]
    seg_kernel = "['seg']['params']['decode_head']['classifier']['kernel']"
    assert seg_kernel in first
    # The segmenter moves on lazy steps only; the conditioner every step.
    assert np.array_equal(first[seg_kernel], second[seg_kernel])
    assert not np.array_equal(states[2][seg_kernel], second[seg_kernel])
    gen = [k for k in first if k.startswith("['gen']['params']") and "controlnet_down_blocks" in k]
    assert gen and any(not np.array_equal(first[k], second[k]) for k in gen)
    assert all(np.isfinite(v).all() for v in states[-1].values())


def test_two_processes_match_one_process(one_device, two_processes):
    procs, out = two_processes
    for i, p in enumerate(procs):
        assert p.wait(timeout=900) == 0, (out / f"worker{i}.log").read_text()[-3000:]
    with open(out / "history.json") as f:
        result = json.load(f)
    assert result["processes"] == 2 and result["devices"] == 4
    final = dict(np.load(out / "state.npz"))
    _assert_same(result["history"], [final], one_device[0], [one_device[1][-1]])


def test_segmenter_schedule_spans_its_own_updates():
    """The segmenter steps on lazy steps from seg_start on; its one-cycle schedule spans those updates."""
    config = control_case.config()
    config.control.update(num_steps=100, n_lazy=8, seg_start=20)
    config.control.seg_optimizer.schedule = "one_cycle"
    setup, _ = aldm.random_setup(config, dataset.text_tokenizer(config))
    assert setup.segmenter_updates(100) == 10  # lazy steps 24, 32, ..., 96
    lr = setup.learning_rates()["lr/seg"]
    first, peak_count = float(setup.seg_schedule(0)), int(np.argmax([setup.seg_schedule(i) for i in range(10)]))
    assert float(lr(0)) == float(lr(24)) == float(lr(31)) == first
    assert float(lr(96)) == float(lr(99)) == float(setup.seg_schedule(9))
    assert 0 < peak_count < 9  # the cycle rises and falls within the run's updates


class _Batches:
    """Resumable batches of the control case: the state is the next batch index."""

    def __init__(self, setup, mesh, state=None):
        self.setup, self.mesh, self.i = setup, mesh, (state or {}).get("next", 0)

    def __next__(self):
        self.i += 1
        return control_case.batch(self.setup, self.mesh, self.i - 1)

    def get_state(self):
        return {"next": self.i}


def test_control_stage_resumes_bitwise(tmp_path):
    """4 steps straight == 2 steps, stop, resume from the orbax checkpoint, 2 more (lazy and plain steps)."""
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])  # the program one_device compiled
    setup, params, _, step = control_case.build(mesh)

    def train(stage_dir, num_steps):
        state, shardings = setup.create_state(mesh, params["unet"], jax.random.PRNGKey(0))
        out = loop.run(name="control", stage_dir=str(stage_dir), state=state, shardings=shardings, step_fn=step,
                       make_batches=lambda s: _Batches(setup, mesh, s), rng=jax.random.PRNGKey(3),
                       num_steps=num_steps, log_every=2, checkpoint_every=2, config={"case": "control"})
        return control_case.flat(sharding.host_copy(out))

    straight = train(tmp_path / "straight", 4)
    train(tmp_path / "resumed", 2)
    resumed = train(tmp_path / "resumed", 4)
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
    assert int(straight["['step']"]) == 4


def test_class_table_standardisation_separates_near_parallel_vectors():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(1, 16))
    table = (shared * 10 + rng.normal(size=(5, 16))).astype(np.float32)  # cosine ~0.99 between classes
    out = conditioning.normalize_table(table, "standardize")
    unit = out / np.linalg.norm(out, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert np.abs(cos - np.eye(5)).max() < 0.8
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 4.0, rtol=1e-5)  # sqrt(D)
    assert conditioning.normalize_table(table, "none") is table
    with pytest.raises(ValueError, match="class_table_norm"):
        conditioning.normalize_table(table, "whiten")


def test_control_starts_from_a_pretrained_discriminator(tmp_path):
    """control.discriminator_init: a segmenter dir's weights become the state's; another architecture is refused."""
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    config = control_case.config()
    ctx = stages.Context(config=config, workdir=Workdir(str(tmp_path)), mesh=mesh)
    setup, params = aldm.random_setup(config, ctx.tokenizer, mesh)
    seg = UperNetSegmenter(setup.seg_config)
    pretrained = jax.device_get(nn.meta.unbox(
        seg.init(jax.random.PRNGKey(123), np.zeros((2, setup.size, setup.size, 3)), train=False)))
    pretrained["batch_stats"] = jax.tree.map(lambda x: x + 0.5, pretrained["batch_stats"])
    model_io.save(str(tmp_path / "seg"), "segmenter", setup.seg_config, pretrained)

    config.control.discriminator_init = "scratch"
    assert control.initial_discriminator(ctx) is None
    config.control.discriminator_init = str(tmp_path / "seg")
    loaded = control.initial_discriminator(ctx)
    state, _ = setup.create_state(mesh, params["unet"], jax.random.PRNGKey(0), loaded)
    got = sharding.host_copy({"params": state["seg"]["params"], "batch_stats": state["seg"]["batch_stats"]})
    for (path, want), have in zip(jax.tree_util.tree_leaves_with_path(pretrained), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(have), err_msg=jax.tree_util.keystr(path))

    # N outputs instead of N + 1 (e.g. the evaluation segmenter): refused by name.
    other = UperNetSegmenter(dataclasses.replace(setup.seg_config, num_classes=setup.seg_config.num_classes - 1))
    model_io.save(str(tmp_path / "evalseg"), "segmenter", other.config,
                  jax.device_get(nn.meta.unbox(other.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)), train=False))))
    config.control.discriminator_init = str(tmp_path / "evalseg")
    with pytest.raises(ConfigError, match="discriminator params do not match"):
        setup.create_state(mesh, params["unet"], jax.random.PRNGKey(0), control.initial_discriminator(ctx))
    config.control.discriminator_init = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="discriminator_init"):
        control.initial_discriminator(ctx)
    config.control.discriminator_init = "stage"  # the workdir has no finished discriminator stage
    with pytest.raises(ConfigError, match="needs the finished `discriminator` stage"):
        control.initial_discriminator(ctx)


def test_the_step_lowers_from_shapes_alone_as_the_scale_benchmark_does():
    """bench/bench_scale.py lowers SD-1.5's step with no weights; the same path, tiny, on a 2x4 mesh."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    ctx = stages.Context(config=control_case.config(), workdir=None, mesh=mesh)
    setup, params = aldm.random_setup(ctx.config, ctx.tokenizer, mesh)
    abstract = setup.abstract_frozen(mesh)
    frozen = setup.frozen(mesh, params["unet"], params["vae"], params["text_encoder"])
    assert jax.tree.structure(abstract) == jax.tree.structure(frozen)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(frozen)):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
    boxed = jax.eval_shape(setup.init, jax.random.PRNGKey(0))
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
    lowered = setup.step(sharding.logical_shardings(boxed, mesh)).lower(
        sharding.sharded_abstract(boxed, mesh), common.abstract_batch(ctx, control_case.BATCH), rng, abstract)
    # The FSDP shardings of the abstract parameters and the batch's split reach the program (Shardy's notation).
    text = lowered.as_text()
    assert '{"fsdp"}' in text and '{"data", "fsdp"}' in text
