"""A finished stage's model files damaged after its DONE marker: named, with the stage to re-run, never used.

When a stage finishes, its DONE.json records the size and SHA-256 of every
model file it left (`sdsup.workdir.record_model_files`); every loader checks
a model's files against that record before reading them. The damage tried:
a truncated params.safetensors, garbage bytes written over the middle of
one (same size: safetensors itself would load it and hand back wrong
weights), a deleted file, an edited config.json. Each stops `sdsup.sample`,
the next stage of `sdsup.train` and `sdsup.convert export` with an error
naming the file and `--only=<stage>`. A DONE.json without the record (a
workdir written before records existed) still loads, unverified.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import smoke_workdir
from cli_harness import assert_clear_error, block_real_work, call_in_process
from sdsup.models import io as model_io
from sdsup.models.vae import AutoencoderKL, VAEConfig
from sdsup.workdir import DONE_FILE, MODEL_FILES_KEY, Workdir, WorkdirError

SMOKE = smoke_workdir.SMOKE_CONFIG
MODEL_STAGES = ("vae", "ldm", "layout", "planner", "discriminator", "control", "evalseg")


def _tiny_vae():
    """A tiny autoencoder's config and random weights, without compiling its init (eval_shape only)."""
    config = VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                       sample_size=8)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(
        AutoencoderKL(config).init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)))["params"]))
    return config, model_io.random_like(abstract)


# How a model file gets damaged after its stage finished: each returns what a reader must be told.
def truncate(path: str) -> str:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "bytes, but stage"


def garbage_in_the_middle(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xde\xad\xbe\xef" * 16)  # inside the tensor data: the file still parses as safetensors
    return "is damaged"


def delete(path: str) -> str:
    os.remove(path)
    return "params.safetensors"


def edit_config(path: str) -> str:
    config_path = os.path.join(os.path.dirname(path), model_io.CONFIG_FILE)
    meta = json.load(open(config_path))
    meta["config"]["latent_channels"] = 8
    json.dump(meta, open(config_path, "w"))
    return "config.json"


DAMAGE = {"truncated": truncate, "garbage": garbage_in_the_middle, "deleted": delete, "config_edited": edit_config}


@pytest.fixture
def finished_vae(tmp_path):
    """A workdir whose vae stage finished (its model saved, then DONE.json written as sdsup.stages does)."""
    wd = Workdir(str(tmp_path / "run"))
    config, params = _tiny_vae()
    wd.save_model("vae", "model", "vae", config, params)
    wd.mark_done("vae", {"steps": 3})
    return wd, os.path.join(wd.model_dir("vae", "model"), model_io.PARAMS_FILE)


def test_done_records_size_and_sha256_of_every_model_file(finished_vae):
    wd, params_path = finished_vae
    record = json.load(open(wd.done_marker("vae")))[MODEL_FILES_KEY]
    assert sorted(record) == ["model/config.json", "model/params.safetensors"]
    assert record["model/params.safetensors"]["bytes"] == os.path.getsize(params_path)
    assert wd.summary("vae") == {"steps": 3}  # the stage's own summary, without the workdir's record
    wd.vae()  # intact: loads


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_model_file_is_named_with_the_stage_to_rerun(finished_vae, damage):
    wd, params_path = finished_vae
    expected = DAMAGE[damage](params_path)
    with pytest.raises(WorkdirError) as error:
        wd.vae()
    message = str(error.value)
    assert expected in message and "--only=vae" in message and os.path.join("vae", "model") in message


def test_without_the_record_garbage_would_load(finished_vae):
    """Why the record is needed: bytes damaged inside the tensor data still parse; only the checksum sees them."""
    wd, params_path = finished_vae
    garbage_in_the_middle(params_path)
    model_io.load(wd.model_dir("vae", "model"))  # no error from the file format itself
    with pytest.raises(WorkdirError, match="is damaged"):
        wd.vae()


def test_a_done_marker_without_a_record_loads_unverified(finished_vae):
    """A workdir written before DONE.json recorded model files: loads as it always did."""
    wd, _ = finished_vae
    marker = wd.done_marker("vae")
    summary = json.load(open(marker))
    del summary[MODEL_FILES_KEY]
    json.dump(summary, open(marker, "w"))
    config, _ = wd.vae()
    assert config.latent_channels == 4


# -- on a finished smoke run: sdsup.sample, the next stage, export ------------------------------------------------


def test_every_finished_model_stage_recorded_its_files(smoke_run):
    workdir, _ = smoke_run
    for stage in MODEL_STAGES:
        record = json.load(open(workdir / stage / DONE_FILE)).get(MODEL_FILES_KEY)
        assert record and any(name.endswith(model_io.PARAMS_FILE) for name in record), stage


@pytest.fixture
def damaged_copy(smoke_run, tmp_path):
    workdir, data_dir = smoke_run
    return smoke_workdir.copy_workdir(workdir, tmp_path / "wd"), data_dir


@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
def test_sample_stops_naming_the_damaged_file(damaged_copy, tmp_path, monkeypatch, damage):
    copy, _ = damaged_copy
    params_path = str(copy / "ldm" / "unet" / model_io.PARAMS_FILE)
    DAMAGE[damage](params_path)
    np.save(tmp_path / "layout.npy", np.zeros((32, 32), np.uint8))
    block_real_work(monkeypatch)  # a damaged model must stop it before any image is generated
    outcome = call_in_process("sample", [f"--workdir={copy}", "--prompt=sky over grass.",
                                         f"--layout={tmp_path / 'layout.npy'}", f"--out={tmp_path / 'out'}"])
    line = assert_clear_error(outcome, "--only=ldm", damage)
    assert os.path.join("ldm", "unet") in line
    assert not (tmp_path / "out").exists()


def test_the_next_stage_stops_naming_the_damaged_file(damaged_copy, monkeypatch):
    copy, data_dir = damaged_copy
    (copy / "control" / DONE_FILE).unlink()  # control runs again; the vae it reads was damaged since vae finished
    garbage_in_the_middle(str(copy / "vae" / "model" / model_io.PARAMS_FILE))
    block_real_work(monkeypatch, allow=("run_all",))  # the stage starts, but must stop before its step compiles
    outcome = call_in_process("train", [f"--config={SMOKE}", f"--workdir={copy}", f"--config.data.data_dir={data_dir}",
                                        "--only=control"])
    line = assert_clear_error(outcome, "--only=vae", "train --only=control")
    assert "vae/model/params.safetensors is damaged" in line
    assert not (copy / "control" / DONE_FILE).exists()


def test_export_stops_naming_the_damaged_file(damaged_copy, tmp_path):
    copy, _ = damaged_copy
    truncate(str(copy / "control" / "controlnet" / model_io.PARAMS_FILE))
    outcome = call_in_process("convert", ["export", f"--from={copy}", f"--out={tmp_path / 'out'}"])
    line = assert_clear_error(outcome, "--only=control", "convert export")
    assert "controlnet/params.safetensors" in line
    assert not (tmp_path / "out").exists()
