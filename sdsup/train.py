r"""Trains the stages a config lists: `python -m sdsup.train --config=... --workdir=...`.

  python -m sdsup.train --config=configs/scenes.py --workdir=workdirs/scenes
  python -m sdsup.train --config=configs/scenes.py:smoke --workdir=workdirs/smoke \
      --config.input.batch_size=16

Multi-host: pass --coordinator_address/--num_processes/--process_id (or the
JAX_* environment variables), or --distributed_auto on TPU pods and SLURM.
The logic lives in libraries (`sdsup.stages`, `sdsup.data`, `sdsup.parallel`);
this file only wires flags to them.
"""

import logging as pylogging
import sys
import types

import jax
from absl import flags, logging
from ml_collections import config_flags

from sdsup import cli, config_lib, parallel, stages
from sdsup.workdir import Workdir

def define_flags():
    f = types.SimpleNamespace()
    f.config = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
    f.workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
    f.coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
    f.num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    f.process_id = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
    f.auto = flags.DEFINE_bool("distributed_auto", False, "Let JAX detect the cluster (TPU pods, SLURM, MPI).")
    f.only = flags.DEFINE_list("only", None, "Run only these of the config's stages.")
    flags.mark_flags_as_required(["config", "workdir"])
    return f


def main(f):
    logging.get_absl_handler().addFilter(_QuietLibraries())
    cli.keep_tensorflow_off_accelerators()
    try:
        config = f.config.value
        config.keys()  # a config file that failed to load raises on first use
    except Exception as e:
        sys.exit("error: cannot load the config: " + cli.one_line(e))
    config_lib.validate(config)
    parallel.initialize_distributed(f.coordinator.value, f.num_processes.value, f.process_id.value, f.auto.value)
    cli.use_compilation_cache(config)
    mesh = parallel.make_mesh(config.mesh)
    divisor = parallel.batch_divisor(mesh)
    if config.input.batch_size % divisor:
        raise config_lib.ConfigError(
            f"config.input.batch_size={config.input.batch_size} is not divisible by the "
            f"data x fsdp mesh size {divisor}")
    workdir = Workdir(f.workdir.value)
    if jax.process_index() == 0:
        workdir.write_config(config_lib.to_json(config))
    logging.info("process %d/%d, mesh %s, workdir %s", jax.process_index(), jax.process_count(),
                 dict(mesh.shape), workdir.path)
    stages.run_all(stages.Context(config=config, workdir=workdir, mesh=mesh), only=f.only.value)


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax and tfds (hundreds of lines a run); keeps warnings."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or not any(p in record.pathname for p in self._NOISY)


def _parse_flags(argv):
    """absl's parser, with config-override mistakes reported as one clear line."""
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        # absl exits with status 1 after printing --help; asking for help is no failure.
        if e.code == 1 and {"--help", "-h", "-?", "--helpshort", "--helpfull"} & set(argv):
            sys.exit(0)
        raise
    except flags.Error as e:  # a value of the wrong type, a missing config file
        sys.exit("error: " + " ".join(str(e).split()))
    except (AttributeError, KeyError) as e:
        # config_flags fails with a bare AttributeError on an unknown key.
        sys.exit(f"error: {_unknown_override(argv) or e}")
    except Exception as e:  # e.g. get_config(arg) rejecting its argument
        sys.exit(f"error: cannot load the config: {type(e).__name__}: {e}")


def _unknown_override(argv):
    for arg in argv[1:]:
        if arg.startswith("--config."):
            hint = config_lib.renamed_key_message(arg[len("--config."):].split("=", 1)[0])
            if hint:
                return hint
    config = _load_config_file(argv)
    if config is None:
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, "config"
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                keys = sorted(node.keys()) if hasattr(node, "keys") else []
                return f"unknown config key {path!r} in {arg}: {walked} has no {part!r} (it has {keys})"
            node, walked = node[part], f"{walked}.{part}"
    return None


def _load_config_file(argv):
    """The config named by --config=FILE[:ARG], loaded without overrides."""
    spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not spec_arg:
        return None
    path, _, arg = spec_arg.partition(":")
    try:
        return config_lib.load(path, arg)
    except Exception:
        return None


if __name__ == "__main__":
    cli.run(main, define_flags, flags_parser=_parse_flags)
