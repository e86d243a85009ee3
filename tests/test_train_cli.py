"""`python -m sdsup.train`: help, config errors before any work, the data stage."""

import json
import os
import re
import subprocess
import sys

import pytest

from sdsup import config_lib
from sdsup.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's shell has
    return subprocess.run([sys.executable, "-m", "sdsup.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _load(arg=""):
    return config_lib.load(os.path.join(ROOT, "configs", "scenes.py"), arg)


def test_help_works():
    result = _train("--help")
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout and "--config" in result.stdout


@pytest.mark.parametrize("arg", ["", "smoke"])
def test_shipped_configs_validate(arg):
    config = _load(arg)
    config_lib.validate(config)
    assert config.stages[0] == "data"


@pytest.mark.parametrize("key, value, message", [
    ("stages", ("data", "nope"), "config.stages has unknown stage 'nope'"),
    ("data.image_size", 30, "config.data.image_size must be a multiple of 8"),
    ("input.batch_size", 0, "config.input.batch_size must be a positive integer"),
    ("data.name", "ade21k", "config.data.name is not a registered dataset"),
    ("text.tokenizer", "bert", "config.text.tokenizer must be"),
    ("control.micro_batches", 3, "config.control.micro_batches must divide control.batch_size=8"),
    ("control.unroll_steps", 10, "config.control.unroll_steps must be in [0, control.grid_steps=10)"),
    ("control.unroll_stride", 0, "config.control.unroll_stride must be a positive integer"),
    ("control.lambda_adv", -0.5, "config.control.lambda_adv must be a number in [0.0, inf]"),
    ("control.layout_encoding", "rgb", "config.control.layout_encoding must be"),
    ("control.discriminator_dtype", "float16", "config.control.discriminator_dtype must be 'float32' or 'bfloat16'"),
    ("ldm.ema_decay", 1.0, "config.ldm.ema_decay must be a number in [0.0, 1.0)"),
    ("vae.num_steps", 0, "config.vae.num_steps must be a positive integer"),
    ("ldm.sample_every", -1, "config.ldm.sample_every must be a non-negative integer"),
    ("stages", ("data", "vae", "ldm", "control"), "config.control.discriminator_init is 'stage', so config.stages "
                                                  "must run 'discriminator' before 'control'"),
    ("discriminator.input", "fakes", "config.discriminator.input must be 'image' or 'reconstruction'"),
    ("layout.map_upsample", "bicubic", "config.layout.map_upsample must be one of ('nearest', 'linear', "),
    ("evalseg.class_balance", 2.0, "config.evalseg.class_balance must be a number in [0.0, 1.0]"),
])
def test_bad_values_name_their_key(key, value, message):
    config = _load("smoke")
    node, *_ = [config]
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    with config.unlocked():
        node[parts[-1]] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_lib.validate(config)


def test_clip_tokenizer_needs_a_path():
    config = _load("smoke")
    config.text.tokenizer = "clip"
    with pytest.raises(ConfigError, match="text.tokenizer_path"):
        config_lib.validate(config)


@pytest.mark.parametrize("override, message", [
    ("--config.nope=1", "unknown config key 'nope'"),
    ("--config.input.bach_size=3", "config.input has no 'bach_size'"),
    ("--config.input.batch_size=abc", "--config.input.batch_size=abc"),
    ("--config.data.image_size=30", "config.data.image_size must be a multiple of 8"),
    ("--config.mesh.data=3", "needs 3 devices, but 1 are available"),
    ("--config.control.discriminator.depths=(2,2,2)",
     "config.control.discriminator was renamed: use config.discriminator.model.depths"),
    ("--config.mesh.tensor=2", "config.mesh.tensor was removed"),
])
def test_cli_config_errors_are_one_clear_line(tmp_path, override, message):
    workdir = tmp_path / "wd"
    result = _train("--config=configs/scenes.py:smoke", f"--workdir={workdir}", override)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "data").exists()  # nothing was built


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = _train("--config=configs/nope.py", f"--workdir={tmp_path}")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("error: cannot load the config") and "nope.py" in last


def test_smoke_data_stage_runs_then_is_skipped(tmp_path):
    workdir, data_dir = tmp_path / "wd", tmp_path / "tfds"
    args = ["--config=configs/scenes.py:smoke", "--only=data", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.data.num_train=64", "--config.data.num_validation=16", "--config.data.num_test=16"]
    result = _train(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads((workdir / "data" / "DONE.json").read_text())
    assert done["splits"]["train"]["examples"] == 64
    assert done["splits"]["train"]["examples_with_held_out_composition"] == 0
    assert done["splits"]["test"]["examples_with_held_out_composition"] == 16
    assert (workdir / "data" / "preview.png").stat().st_size > 1000
    assert json.loads((workdir / "config.json").read_text())["data"]["num_train"] == 64

    again = _train(*args)
    assert again.returncode == 0 and "finished earlier" in again.stderr

    # A corrupt dataset directory: a clear one-line error; the finished stage stays.
    (workdir / "data" / "DONE.json").unlink()
    for path in data_dir.rglob("*train.array_record*"):
        path.write_bytes(b"garbage")
    broken = _train(*args)
    last = broken.stderr.strip().splitlines()[-1]
    assert broken.returncode != 0 and "incomplete or corrupt" in last and str(data_dir) in last
    assert (workdir / "data" / "preview.png").exists()
