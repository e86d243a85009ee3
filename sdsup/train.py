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
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_AUTO = flags.DEFINE_bool("distributed_auto", False, "Let JAX detect the cluster (TPU pods, SLURM, MPI).")
_ONLY = flags.DEFINE_list("only", None, "Run only these of the config's stages.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # TensorFlow (tfds, clu) must never take an accelerator from JAX.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    import jax

    from sdsup import config_lib, parallel, stages
    from sdsup.errors import SdsupError

    try:
        config = _CONFIG.value
        config.keys()  # a config file that failed to load raises on first use
    except Exception as e:
        sys.exit("error: cannot load the config: " + " ".join(str(e).split()))
    try:
        config_lib.validate(config)
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _AUTO.value)
        cache = config.jax_cache_dir or os.path.expanduser("~/.cache/sdsup/jax")
        jax.config.update("jax_compilation_cache_dir", cache)
        mesh = parallel.make_mesh(config.mesh)
        divisor = parallel.batch_divisor(mesh)
        if config.input.batch_size % divisor:
            raise config_lib.ConfigError(
                f"config.input.batch_size={config.input.batch_size} is not divisible by the "
                f"data x fsdp mesh size {divisor}")
        workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            _write_config(workdir, config_lib.to_json(config))
        logging.info("process %d/%d, mesh %s, workdir %s", jax.process_index(), jax.process_count(),
                     dict(mesh.shape), workdir)
        stages.run_all(stages.Context(config=config, workdir=workdir, mesh=mesh), only=_ONLY.value)
    except SdsupError as e:
        sys.exit(f"error: {e}")


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
    from sdsup import config_lib

    path, _, arg = spec_arg.partition(":")
    try:
        return config_lib.load(path, arg)
    except Exception:
        return None


def _write_config(workdir: str, text: str) -> None:
    """Writes config.json; an earlier, different one is kept as config.<n>.json."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
        n = 1
        while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
        os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
