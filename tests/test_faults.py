"""Faults a training run meets, the fast subset (the slow ones: test_faults_extended.py; docs/reliability.md).

A damaged latest checkpoint (truncated or missing array file, deleted item,
garbage metadata, an empty step directory): the loop warns naming what is
wrong, resumes from the newest intact checkpoint and ends bitwise where an
undisturbed run ends; the damaged one is moved aside, never deleted. With
none intact: one clear error naming the directory, nothing changed. A full
disk while saving: one clear error naming the step, the previous checkpoint
intact, and the run resumes once there is space. SIGTERM during a step: a
checkpoint of that step and exit status 75 (retry).
"""

import errno
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging

import toy_training
from sdsup import parallel
from sdsup.trainer import checkpoint, loop, preemption

# A failed TensorStore read leaves a callback for an event loop orbax has closed; Python reports it as unraisable.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, DAMAGED_STEP, INTACT_STEP = 15, 10, 5  # checkpoints every 5 steps


def _train(stage_dir, mesh, num_steps):
    state, shardings, step = toy_training.toy_setup(mesh)
    final = loop.run(name="toy", stage_dir=str(stage_dir), state=state, shardings=shardings, step_fn=step,
                     make_batches=lambda s: toy_training.Batches(mesh, s), rng=jax.random.PRNGKey(1),
                     num_steps=num_steps, log_every=5, checkpoint_every=5, keep_checkpoints=3, config={"toy": True})
    return [np.asarray(x) for x in jax.tree.leaves(final)]


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": -1})


@pytest.fixture(scope="module")
def straight(mesh, tmp_path_factory):
    """The parameters of an undisturbed run of STEPS steps."""
    return _train(tmp_path_factory.mktemp("straight"), mesh, STEPS)


@pytest.fixture(scope="module")
def trained(mesh, tmp_path_factory):
    """A stage directory trained to DAMAGED_STEP: checkpoints at 5 and 10 (copied by each test)."""
    stage = tmp_path_factory.mktemp("trained")
    _train(stage, mesh, DAMAGED_STEP)
    return stage


def _array_files(step_dir):
    """The OCDBT data files that hold the arrays' bytes (under state/d/ or state/ocdbt.process_0/d/, depending on
    how orbax merged the processes' stores)."""
    state = os.path.join(step_dir, "state")
    return [os.path.join(root, name) for root, _, names in os.walk(state) if os.path.basename(root) == "d"
            for name in names]


def _truncate_array_files(step_dir):
    for path in _array_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return "OUT_OF_RANGE"  # TensorStore's words for reading past a file's end


def _delete_array_files(step_dir):
    for path in _array_files(step_dir):
        os.remove(path)
    return "NOT_FOUND"


def _delete_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))
    return "item 'state' is missing"


def _garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{garbage")
    return "state/_METADATA is not valid JSON"


def _garbage_array_index(step_dir):
    with open(os.path.join(step_dir, "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"garbage")
    return "DATA_LOSS"  # TensorStore cannot decode the index of the arrays' store


def _garbage_data_state(step_dir):
    with open(os.path.join(step_dir, "data", "metadata"), "w") as f:
        f.write("\x00\x01")
    return "data/metadata is not valid JSON"


def _empty_step_directory(step_dir):
    """A crash between creating a step's directory and filling it: a newer, empty step."""
    empty = os.path.join(os.path.dirname(step_dir), str(DAMAGED_STEP + 1))
    os.makedirs(empty)
    return "directory is empty"


DAMAGES = [_truncate_array_files, _delete_array_files, _delete_item, _garbage_metadata, _garbage_array_index,
           _garbage_data_state, _empty_step_directory]


def _snapshot(directory):
    """{relative path: bytes} of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def absl_warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: seen.append(msg % args))
    return seen


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(damage, trained, straight, mesh, tmp_path,
                                                               absl_warnings):
    stage = shutil.copytree(trained, tmp_path / "stage")
    checkpoints = stage / "checkpoints"
    expected = damage(str(checkpoints / str(DAMAGED_STEP)))
    damaged_step = DAMAGED_STEP + 1 if damage is _empty_step_directory else DAMAGED_STEP
    before = _snapshot(checkpoints / str(damaged_step))
    resumed = _train(stage, mesh, STEPS)
    warnings = " ".join(absl_warnings)
    assert f"checkpoint step {damaged_step} in {checkpoints} is unusable" in warnings and expected in warnings
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed))  # resumed from the intact one, exactly
    # Nothing deleted: the damaged checkpoint is beside the others, byte for byte, under a name orbax ignores.
    assert _snapshot(checkpoints / f"{damaged_step}{checkpoint.UNUSABLE_SUFFIX}") == before
    assert checkpoint.Checkpointer(str(checkpoints)).all_steps() == [5, 10, 15]


def test_no_intact_checkpoint_is_one_clear_error_that_changes_nothing(trained, mesh, tmp_path):
    stage = shutil.copytree(trained, tmp_path / "stage")
    checkpoints = stage / "checkpoints"
    _truncate_array_files(str(checkpoints / str(DAMAGED_STEP)))
    _delete_item(str(checkpoints / str(INTACT_STEP)))
    before = _snapshot(checkpoints)
    with pytest.raises(checkpoint.NoIntactCheckpointError) as error:
        _train(stage, mesh, STEPS)
    message = str(error.value)
    assert "\n" not in message and f"no intact checkpoint in {checkpoints}" in message
    assert "step 10: its arrays cannot be opened: ValueError: OUT_OF_RANGE" in message
    assert "step 5: item 'state' is missing" in message
    assert _snapshot(checkpoints) == before


def _disk_full_from(step):
    """A JSON writer of orbax that fails as a full disk does, for saves of `step` and later."""
    original = ocp.JsonCheckpointHandler._save_fn

    async def save(self, x, directory):
        if int(directory.parent.name.split(".")[0]) >= step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        await original(self, x, directory)
    return save


def test_a_full_disk_stops_with_one_clear_error_and_the_run_resumes_later(mesh, straight, tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", _disk_full_from(DAMAGED_STEP))
    with pytest.raises(checkpoint.CheckpointWriteError) as error:
        _train(tmp_path, mesh, STEPS)
    message = str(error.value)
    assert "\n" not in message
    assert (f"cannot write checkpoint step {DAMAGED_STEP} to {checkpoints}: no space left on device; "
            f"the previous checkpoint (step {INTACT_STEP}) is intact") in message
    assert checkpoint.Checkpointer(str(checkpoints)).all_steps() == [INTACT_STEP]
    intact = _snapshot(checkpoints / str(INTACT_STEP))

    monkeypatch.undo()  # space is back
    resumed = _train(tmp_path, mesh, STEPS)
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed))
    assert _snapshot(checkpoints / str(INTACT_STEP)) == intact


def test_disk_full_is_recognised_in_tensorstore_errors_too():
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 83 bytes '
                             "to file 15: No space left on device [os_error_code='28']")
    wrapped = Exception("Encountered error while writing")
    wrapped.__cause__ = tensorstore
    assert checkpoint.is_disk_full(wrapped) and checkpoint.is_disk_full(OSError(errno.ENOSPC, "full"))
    assert not checkpoint.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def _worker(stage_dir, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, os.path.join(HERE, "fault_worker.py"), str(stage_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigterm_during_a_step_saves_that_step_and_exits_for_a_retry(tmp_path):
    args = ("--steps=40", "--checkpoint_every=100", "--step_seconds=0.2")
    worker = _worker(tmp_path, *args)
    for line in worker.stdout:
        if line.strip() == "step 3":
            worker.send_signal(signal.SIGTERM)
            break
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == preemption.RETRY_EXIT_STATUS, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("preempted: toy: stopped at step") and "Traceback" not in err
    saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps()
    assert len(saved) == 1 and 3 < saved[0] < 40  # the step under way when the signal came

    again = _worker(tmp_path, *args[:2])
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-3000:]
    assert out.splitlines()[0] == f"step {saved[0] + 1}" and out.splitlines()[-1].startswith("final ")


def test_the_local_launcher_starts_every_process_again_after_a_preemption(tmp_path):
    starts = tmp_path / "starts"
    fake_python = tmp_path / "python"  # stands in for `python -m sdsup.train`: preempted the first time
    fake_python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {starts}\n'
                           f'[[ $(wc -l < {starts}) -le 2 ]] && exit {preemption.RETRY_EXIT_STATUS}\nexit 0\n')
    fake_python.chmod(0o755)
    launcher = os.path.join(os.path.dirname(HERE), "launch", "local_multiprocess.sh")
    env = dict(os.environ, NUM_PROCESSES="2", PYTHON=str(fake_python))
    result = subprocess.run(["bash", launcher, "--workdir=wd"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = starts.read_text().splitlines()
    assert len(lines) == 4 and all("--workdir=wd" in line for line in lines)
    assert "starting again, retry 1 of 3" in result.stderr

    starts.unlink()
    result = subprocess.run(["bash", launcher, "--workdir=wd"], env=dict(env, RETRIES="0"), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == preemption.RETRY_EXIT_STATUS  # no retries left: the status goes to the caller
