"""Faults a training run meets, the slow ones (SDSUP_ALL_TESTS=1; the fast subset: test_faults.py).

- kill -9 at 5 seeded random moments of the smoke pipeline, one of them while
  an asynchronous checkpoint is being written (the writer slowed down on
  purpose, checkpoint.SLOW_WRITES_VARIABLE), restarted each time: every
  stage's model files are bitwise those of the session's uninterrupted run.
- SIGTERM to `sdsup.train` during a compile, a step and a save: exit status
  75, a usable checkpoint (none when none had started), and the resumed
  stage ends bitwise where the uninterrupted run did.
- A dead process of a two-process run (jax.distributed on 127.0.0.1): the
  survivor exits within the heartbeat timeout, naming the cause; restarting
  both resumes and ends bitwise where an undisturbed run ends. SIGTERM to one
  process stops both at the same step with a checkpoint.
- Memory: 2,000 steps of the smoke `ldm` stage; resident memory grows < 5%
  after warm-up.

Figures (kill points, timings) are printed; run with -s to see them.
docs/reliability.md has the latest.
"""

import glob
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import smoke_workdir
from sdsup import config_lib
from sdsup.trainer import checkpoint, preemption

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("data", "vae", "ldm", "layout", "planner", "discriminator", "control", "evalseg", "evaluate")
CHECKPOINTED = ("vae", "ldm", "layout", "planner", "discriminator", "control", "evalseg")
# Checkpoints every few steps, so that a kill in a stage resumes inside it rather than from its start.
CHECKPOINT_EVERY = {stage: 2 if stage == "control" else 5 for stage in CHECKPOINTED}
FREQUENT_CHECKPOINTS = tuple(f"--config.{stage}.checkpoint_every={n}" for stage, n in CHECKPOINT_EVERY.items())
SMOKE_STEPS = {stage: config_lib.load(os.path.join(ROOT, "configs", "scenes.py"), "smoke")[stage].num_steps
               for stage in CHECKPOINTED}
KILL_SEED, KILLS = 24, 5
SLOW_WRITE_S = 2  # each checkpoint's data item waits this long in the background writer
HEARTBEAT_TIMEOUT_S = 10
RUN_TIMEOUT_S = 1200


class TrainProcess:
    """`python -m sdsup.train ARGS` (or another command) with its stderr lines collected as they come."""

    def __init__(self, args, env=None, command=None):
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
        environment.pop("XLA_FLAGS", None)  # one CPU device, as a user's shell has
        environment["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(command or [sys.executable, "-m", "sdsup.train", *args], cwd=ROOT,
                                        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines, self.out = [], []
        self._readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((self.process.stderr, self.lines), (self.process.stdout, self.out))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into):
        for line in stream:
            into.append(line)

    def seen(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, condition, timeout_s: float = RUN_TIMEOUT_S) -> bool:
        """Polls `condition()` until true (True) or the process ends or time runs out (False)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if condition():
                return True
            if self.process.poll() is not None:
                return bool(condition())
            time.sleep(0.05)
        return False

    def finish(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        self.process.wait(timeout_s)
        for reader in self._readers:
            reader.join(10)
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def _smoke_args(workdir, data_dir, *extra):
    return [f"--config={smoke_workdir.SMOKE_CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            *extra]


def _model_files(workdir) -> dict:
    """{relative path: sha256} of every stage's model files (and the conditioner's class table)."""
    paths = glob.glob(os.path.join(workdir, "*", "*", "params.safetensors")) + \
        glob.glob(os.path.join(workdir, "*", "*.npy"))
    out = {}
    for path in paths:
        with open(path, "rb") as f:
            out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _writes_in_flight(stage_dir, step="*") -> list:
    return glob.glob(os.path.join(stage_dir, "checkpoints", f"{step}.orbax-checkpoint-tmp*"))


def _complete(stage_dir, step) -> bool:
    return step in checkpoint.complete_steps(os.path.join(stage_dir, "checkpoints"))


def kill_schedule(seed: int, stage_seconds: dict) -> list:
    """KILLS moments, in pipeline order, each in a stage of its own.

    One while checkpoint `step` of a stage is being written (an earlier one is complete); two a random time
    (under a second) after a random checkpoint of a stage is complete, so that the restart resumes inside the
    stage; two a random fraction of a random stage's duration (in the reference run) after it starts: a compile,
    the dataset's build, writing model files, the evaluation, whatever is under way.
    """
    rng = random.Random(seed)
    steps = {stage: range(CHECKPOINT_EVERY[stage], num_steps, CHECKPOINT_EVERY[stage])
             for stage, num_steps in SMOKE_STEPS.items()}  # the last step's checkpoint ends the stage
    write, *after = rng.sample([s for s in CHECKPOINTED if len(steps[s]) > 1], 3)
    timed = rng.sample([s for s in STAGES if s not in (write, *after)], 2)
    kills = [{"stage": write, "when": "during_write", "step": rng.choice(steps[write][1:])}]
    kills += [{"stage": s, "when": "after_checkpoint", "step": rng.choice(steps[s]), "delay_s": round(rng.random(), 2)}
              for s in after]
    kills += [{"stage": s, "when": "timed", "delay_s": round(rng.uniform(0.1, 0.8) * stage_seconds[s], 2)}
              for s in timed]
    return sorted(kills, key=lambda k: STAGES.index(k["stage"]))


def _wait_for_the_moment(run, kill, stage_dir) -> bool:
    stage = kill["stage"]
    if not run.wait_for(lambda: run.seen(f"stage {stage}: starting")):
        return False
    if kill["when"] == "during_write":
        return run.wait_for(lambda: _writes_in_flight(stage_dir, kill["step"]))
    if kill["when"] == "after_checkpoint" and not run.wait_for(lambda: _complete(stage_dir, kill["step"])):
        return False
    started = time.monotonic()
    # A stage that ends before the moment: the kill comes as it ends (between stages).
    return run.wait_for(lambda: time.monotonic() - started >= kill["delay_s"] or run.seen(f"stage {stage}: done"))


@pytest.fixture(scope="module")
def reference(smoke_run):
    """(workdir, data_dir, model file digests) of the session's uninterrupted smoke run."""
    workdir, data_dir = smoke_run
    return workdir, data_dir, _model_files(workdir)


def test_kill_9_at_five_random_moments_changes_no_bit_of_any_model(reference, tmp_path):
    ref_workdir, _, ref_models = reference
    assert len(ref_models) >= 10
    stage_seconds = {s: json.loads((ref_workdir / s / "DONE.json").read_text())["seconds"] for s in STAGES}
    workdir, data_dir = tmp_path / "wd", tmp_path / "tfds"  # its own dataset: the data stage is killed too
    args = _smoke_args(workdir, data_dir, *FREQUENT_CHECKPOINTS)
    slow = {checkpoint.SLOW_WRITES_VARIABLE: str(SLOW_WRITE_S)}
    record = []
    for kill in kill_schedule(KILL_SEED, stage_seconds):
        run = TrainProcess(args, env=slow)
        stage_dir = str(workdir / kill["stage"])
        hit = _wait_for_the_moment(run, kill, stage_dir)
        in_flight = [os.path.basename(p) for p in _writes_in_flight(stage_dir)]
        complete = checkpoint.complete_steps(os.path.join(stage_dir, "checkpoints"))
        run.process.send_signal(signal.SIGKILL)
        status = run.finish()
        assert hit and status == -signal.SIGKILL, (kill, status, run.stderr[-3000:])
        record.append(dict(kill, writes_in_flight=in_flight, complete_checkpoints=complete,
                           last_log=run.lines[-1].strip()[-120:] if run.lines else "",
                           resumed=[line.split("] ")[-1].strip() for line in run.lines if "resumed from step" in line]))
    final = TrainProcess(args)
    assert final.finish() == 0, final.stderr[-3000:]
    record.append({"final_run_resumed": [line.split("] ")[-1].strip() for line in final.lines
                                         if "resumed from step" in line]})
    print(json.dumps(record, indent=1))
    assert any(k.get("writes_in_flight") for k in record[:-1])  # one kill hit an asynchronous write
    resumed = [line for k in record[1:] for line in k.get("resumed", k.get("final_run_resumed", []))]
    assert len(resumed) >= 3, record  # restarts resumed inside stages, not only from their starts
    assert _model_files(workdir) == ref_models


# -- preemption through the command line -------------------------------------------------------------------------

def _vae_only(workdir, data_dir, *extra):
    """The data and vae stages of the smoke config, on the session's dataset."""
    return _smoke_args(workdir, data_dir, "--only=data,vae", *extra)


def _saved_steps(stage_dir) -> list:
    return checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints")).all_steps()


def _resume_and_compare(workdir, data_dir, reference_models, *extra):
    resumed = TrainProcess(_vae_only(workdir, data_dir, *extra))
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert _model_files(workdir)["vae/model/params.safetensors"] == reference_models["vae/model/params.safetensors"]
    return resumed


def test_sigterm_during_the_compile_exits_for_a_retry_with_nothing_started(reference, tmp_path):
    _, data_dir, ref_models = reference
    workdir = tmp_path / "wd"
    # An empty compilation cache: the step's compile takes long enough to be interrupted.
    run = TrainProcess(_vae_only(workdir, data_dir, f"--config.jax_cache_dir={tmp_path / 'cold_cache'}"))
    assert run.wait_for(lambda: run.seen("stage vae: starting")), run.stderr[-3000:]
    time.sleep(2)
    signalled = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    status = run.finish()
    exit_seconds = time.monotonic() - signalled
    print(json.dumps({"sigterm_during_compile_exit_s": round(exit_seconds, 2)}))
    assert status == preemption.RETRY_EXIT_STATUS, run.stderr[-3000:]
    assert not run.seen("train step compiled"), "the signal came after the compile"
    assert run.lines[-1].startswith("preempted: SIGTERM while no checkpoint was being written")
    assert exit_seconds < 10  # at once, not when the compile ends
    assert not glob.glob(str(workdir / "vae" / "checkpoints" / "*")) and not (workdir / "vae" / "DONE.json").exists()
    assert (workdir / "data" / "DONE.json").exists()
    _resume_and_compare(workdir, data_dir, ref_models)


def test_sigterm_during_a_step_saves_it_and_the_resumed_stage_is_bitwise_the_same(reference, tmp_path):
    _, data_dir, ref_models = reference
    workdir = tmp_path / "wd"
    rare = "--config.vae.checkpoint_every=1000"  # only the signal's checkpoint
    run = TrainProcess(_vae_only(workdir, data_dir, rare))
    assert run.wait_for(lambda: run.seen("train step compiled")), run.stderr[-3000:]
    time.sleep(1.5)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == preemption.RETRY_EXIT_STATUS, run.stderr[-3000:]
    assert "preempted: vae: stopped at step" in run.lines[-1] and "Traceback" not in run.stderr
    (step,) = _saved_steps(str(workdir / "vae"))
    assert 0 < step < 20 and f"stopped at step {step} " in run.lines[-1]
    resumed = _resume_and_compare(workdir, data_dir, ref_models, rare)
    assert resumed.seen(f"vae: resumed from step {step}")


def test_sigterm_during_an_asynchronous_save_keeps_it_and_saves_the_next_step(reference, tmp_path):
    _, data_dir, ref_models = reference
    workdir = tmp_path / "wd"
    args = ("--config.vae.checkpoint_every=5",)
    run = TrainProcess(_vae_only(workdir, data_dir, *args), env={checkpoint.SLOW_WRITES_VARIABLE: "3"})
    assert run.wait_for(lambda: _writes_in_flight(str(workdir / "vae"))), run.stderr[-3000:]
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == preemption.RETRY_EXIT_STATUS, run.stderr[-3000:]
    steps = _saved_steps(str(workdir / "vae"))
    assert steps[0] == 5 and len(steps) == 2 and steps[1] > 5, steps  # the write in flight finished, then one more
    assert not _writes_in_flight(str(workdir / "vae"))
    resumed = _resume_and_compare(workdir, data_dir, ref_models, *args)
    assert resumed.seen(f"vae: resumed from step {steps[1]}")


# -- two processes ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(stage_dir, *args):
    port = _free_port()
    return [TrainProcess(None, command=[sys.executable, os.path.join(HERE, "fault_worker.py"), str(stage_dir),
                                        f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                                        f"--heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}", *args])
            for i in range(2)]


TWO_PROCESS_RUN = ("--steps=60", "--checkpoint_every=10")


def _finish_both(workers):
    statuses = [w.finish() for w in workers]
    assert statuses == [0, 0], [w.stderr[-2000:] for w in workers]
    progress = [[line for line in w.out if line.startswith(("step ", "final "))] for w in workers]
    assert progress[0][-1].startswith("final ") and progress[0][-1] == progress[1][-1], progress
    return progress[0]


@pytest.fixture(scope="module")
def undisturbed_two_process_run(tmp_path_factory):
    """The last stdout line (`final <checksum>`) of an undisturbed two-process run."""
    return _finish_both(_two_processes(tmp_path_factory.mktemp("undisturbed"), *TWO_PROCESS_RUN))[-1]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_a_dead_process_ends_the_other_in_bounded_time_and_both_resume(victim, undisturbed_two_process_run,
                                                                        tmp_path):
    workers = _two_processes(tmp_path, *TWO_PROCESS_RUN, "--step_seconds=0.1")
    assert workers[0].wait_for(lambda: "step 25\n" in workers[0].out), workers[0].stderr[-3000:]
    workers[victim].process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = workers[1 - victim]
    status = survivor.finish(timeout_s=HEARTBEAT_TIMEOUT_S + 120)
    exit_seconds = time.monotonic() - killed
    workers[victim].finish()
    print(json.dumps({"victim": victim, "survivor_exit_s": round(exit_seconds, 2), "survivor_status": status}))
    assert status != 0 and exit_seconds < HEARTBEAT_TIMEOUT_S + 60
    assert survivor.seen("Terminating process because the JAX distributed service detected fatal errors")

    restarted = _two_processes(tmp_path, *TWO_PROCESS_RUN)
    out = _finish_both(restarted)
    assert int(out[0].split()[1]) > 1 and out[-1] == undisturbed_two_process_run  # resumed, bitwise the same


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(undisturbed_two_process_run, tmp_path):
    workers = _two_processes(tmp_path, *TWO_PROCESS_RUN, "--step_seconds=0.1")
    assert workers[1].wait_for(lambda: "step 15\n" in workers[1].out), workers[1].stderr[-3000:]
    workers[1].process.send_signal(signal.SIGTERM)
    assert [w.finish() for w in workers] == [preemption.RETRY_EXIT_STATUS] * 2, [w.stderr[-2000:] for w in workers]
    stops = {w.lines[-1].split(" on SIGTERM")[0] for w in workers}
    assert len(stops) == 1, stops
    step = int(stops.pop().split("stopped at step ")[1])
    resumed = _finish_both(_two_processes(tmp_path, *TWO_PROCESS_RUN))
    assert resumed[0] == f"step {step + 1}\n" and resumed[-1] == undisturbed_two_process_run


# -- a really full disk ------------------------------------------------------------------------------------------

FULL_DISK_SCRIPT = """
set -e
mount -t tmpfs -o size=4m tmpfs "$DISK"
run() {  # run NAME STEPS: the worker on the small disk; its status in OUT/NAME.status
  local status=0
  "$PYTHON" "$WORKER" "$DISK/stage" --steps=$2 --checkpoint_every=5 > "$OUT/$1.out" 2> "$OUT/$1.err" || status=$?
  echo "$status" > "$OUT/$1.status"
  ls "$DISK/stage/checkpoints" > "$OUT/$1.listing"
}
run first 10
dd if=/dev/zero of="$DISK/filler" bs=4k 2> /dev/null || true  # the disk is full...
truncate -s -32K "$DISK/filler"  # ...but for a few pages: metrics fit, a checkpoint (about 100 KiB) does not
run almost_full 20
dd if=/dev/zero of="$DISK/filler2" bs=4k 2> /dev/null || true  # not a byte left: not even the metrics file fits
run full 20
rm "$DISK/filler" "$DISK/filler2"  # space is back
run resumed 20
"""


def _can_mount_in_a_namespace() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_in_a_namespace(), reason="needs unshare -rm (user and mount namespaces)")
def test_a_really_full_disk_stops_the_run_clearly_and_it_resumes_once_there_is_space(tmp_path):
    """A 4 MiB tmpfs, mounted in a private namespace, filled after step 10's checkpoint: TensorStore's, orbax's and
    TensorFlow's own errors for a full disk (test_faults.py patches a writer instead)."""
    undisturbed = TrainProcess(None, command=[sys.executable, os.path.join(HERE, "fault_worker.py"),
                                             str(tmp_path / "undisturbed"), "--steps=20", "--checkpoint_every=5"])
    assert undisturbed.finish() == 0, undisturbed.stderr[-2000:]
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    env = {"DISK": str(disk), "OUT": str(out), "PYTHON": sys.executable,
           "WORKER": os.path.join(HERE, "fault_worker.py")}
    script = TrainProcess(None, env=env, command=["unshare", "-rm", "bash", "-c", FULL_DISK_SCRIPT])
    assert script.finish() == 0, script.stderr[-2000:]
    read = lambda name, kind: (out / f"{name}.{kind}").read_text()
    assert read("first", "status").strip() == "0" and read("resumed", "status").strip() == "0"
    for name, expected in (("almost_full", "error: cannot write checkpoint step 15 to "),
                           ("full", "error: stage toy: no space left on device under ")):
        last = read(name, "err").strip().splitlines()[-1]
        assert read(name, "status").strip() == "1" and last.startswith(expected), (name, read(name, "err")[-3000:])
        assert "no space left on device" in last and "(step 10) is intact" in last
        assert "10" in read(name, "listing").split() and "15" not in read(name, "listing").split()
    resumed = [line for line in read("resumed", "out").splitlines() if line.startswith(("step ", "final "))]
    assert resumed[0] == "step 11" and resumed[-1] == undisturbed.out[-1].strip()


# -- memory -----------------------------------------------------------------------------------------------------

def _bench_faults():
    spec = importlib.util.spec_from_file_location("bench_faults", os.path.join(ROOT, "bench", "bench_faults.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resident_memory_grows_less_than_5_percent_over_2000_steps(reference, tmp_path):
    ref_workdir, data_dir, _ = reference
    workdir = tmp_path / "wd"
    for stage in ("data", "vae"):  # the ldm stage needs a finished vae
        shutil.copytree(ref_workdir / stage, workdir / stage)
    result = _bench_faults().measure_memory(str(workdir), str(data_dir))
    samples = result.pop("samples")
    print(json.dumps(dict(result, every_200=[(s, round(r, 1)) for s, r in samples if s % 200 == 0])))
    assert result["growth_percent"] < 5, result
