r"""Trains the stages a config lists: `python -m sdsup.train --config=... --workdir=...`.

  python -m sdsup.train --config=configs/scenes.py --workdir=workdirs/scenes
  python -m sdsup.train --config=configs/scenes.py:smoke --workdir=workdirs/smoke \
      --config.input.batch_size=16

Multi-host: pass --coordinator_address/--num_processes/--process_id (or the
JAX_* environment variables), or --distributed_auto on TPU pods and SLURM.
The logic lives in libraries (`sdsup.stages`, `sdsup.data`, `sdsup.parallel`);
this file only wires flags to them.

Exit status: 0 finished; 1 an error (one line, `error: ...`); 75 preempted
(SIGTERM): a usable checkpoint was kept, run the same command again
(`sdsup.trainer.preemption`; docs/reliability.md lists every fault).
"""

import logging as pylogging
import sys
import types

import jax
from absl import flags, logging
from ml_collections import config_flags

from sdsup import cli, config_lib, parallel, stages
from sdsup.trainer import checkpoint, preemption
from sdsup.workdir import Workdir

def define_flags():
    f = types.SimpleNamespace()
    f.config = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
    f.workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
    f.coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
    f.num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    f.process_id = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
    f.auto = flags.DEFINE_bool("distributed_auto", False, "Let JAX detect the cluster (TPU pods, SLURM, MPI).")
    f.heartbeat_timeout = flags.DEFINE_integer(
        "heartbeat_timeout_s", None, "Multi-process runs: seconds without a heartbeat after which a process counts "
        "as dead and the others stop (JAX's default: 100).", lower_bound=1)
    f.only = flags.DEFINE_list("only", None, "Run only these of the config's stages.")
    flags.mark_flags_as_required(["config", "workdir"])
    return f


def main(f):
    # First: SIGTERM from here on exits with the retry status, or, in a training loop, saves first.
    preemption.exit_on_sigterm()
    logging.get_absl_handler().addFilter(_QuietLibraries())
    cli.keep_tensorflow_off_accelerators()
    config = cli.loaded_config(f.config)
    config_lib.validate(config)
    config_lib.check_only(f.only.value, config)
    parallel.initialize_distributed(f.coordinator.value, f.num_processes.value, f.process_id.value, f.auto.value,
                                    heartbeat_timeout_s=f.heartbeat_timeout.value)
    cli.use_compilation_cache(config)
    mesh = parallel.make_mesh(config.mesh)
    divisor = parallel.batch_divisor(mesh)
    if config.input.batch_size % divisor:
        raise config_lib.ConfigError(
            f"config.input.batch_size={config.input.batch_size} is not divisible by the "
            f"data x fsdp mesh size {divisor}")
    workdir = Workdir(f.workdir.value)
    workdir.check_config(config_lib.to_json(config))  # every process: a refused config stops them all
    if jax.process_index() == 0:
        workdir.write_config(config_lib.to_json(config))
    logging.info("process %d/%d, mesh %s, workdir %s", jax.process_index(), jax.process_count(),
                 dict(mesh.shape), workdir.path)
    try:
        with preemption.retry_status_on_preemption():
            stages.run_all(stages.Context(config=config, workdir=workdir, mesh=mesh), only=f.only.value)
    except OSError as e:
        if checkpoint.is_disk_full(e):  # a model file or picture (checkpoints raise CheckpointWriteError)
            sys.exit(f"error: no space left on device: {cli.one_line(e)}; free space, then run the same command "
                     "again (finished stages are kept)")
        raise


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax and tfds (hundreds of lines a run); keeps warnings."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or not any(p in record.pathname for p in self._NOISY)


if __name__ == "__main__":
    cli.run(main, define_flags)
