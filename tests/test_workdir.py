"""The workdir module: where stages leave what, DONE markers, loaders that name the stage to re-run, old configs."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from sdsup import config_lib
from sdsup.models import io as model_io
from sdsup.models.vae import AutoencoderKL, VAEConfig
from sdsup.workdir import Workdir, WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_vae():
    config = VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                       sample_size=8)
    params = jax.device_get(nn.meta.unbox(AutoencoderKL(config).init(jax.random.PRNGKey(0),
                                                                      np.zeros((1, 8, 8, 3)))["params"]))
    return config, params


def test_models_round_trip_and_stages_are_marked_done(tmp_path):
    wd = Workdir(str(tmp_path / "run"))
    config, params = _tiny_vae()
    assert not wd.is_done("vae")
    with pytest.raises(WorkdirError, match=r"stage vae \(the autoencoder\) has not finished.*--only=vae"):
        wd.require("vae")
    wd.save_model("vae", "model", "vae", config, params)
    wd.mark_done("vae", {"steps": 3})
    wd.require("vae")
    assert wd.summary("vae") == {"steps": 3}
    assert not list((tmp_path / "run" / "vae").glob("*.tmp"))  # the marker was written atomically
    got_config, got_params = wd.vae()
    assert got_config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got_params)):
        np.testing.assert_array_equal(a, b)


def test_missing_damaged_or_wrong_models_name_the_stage_to_rerun(tmp_path):
    wd = Workdir(str(tmp_path))
    with pytest.raises(WorkdirError, match=r"holds no sdsup model.*re-run stage ldm.*--only=ldm"):
        wd.ldm()
    config, params = _tiny_vae()
    wd.save_model("ldm", "unet", "vae", config, params)  # a model of the wrong kind where the UNet belongs
    with pytest.raises(WorkdirError, match="holds a vae, not a unet"):
        wd.ldm()
    wd.save_model("vae", "model", "vae", config, params)
    (tmp_path / "vae" / "model" / model_io.CONFIG_FILE).write_text("{not json")
    with pytest.raises(WorkdirError, match="re-run stage vae"):
        wd.vae()


def test_a_config_written_before_keys_moved_is_brought_up_to_date(tmp_path):
    old = config_lib.load(os.path.join(ROOT, "configs", "scenes.py"), "smoke").to_dict()
    old["control"]["discriminator"] = old["discriminator"].pop("model")
    old["mesh"]["tensor"] = 1
    (tmp_path / "config.json").write_text(json.dumps(old, default=str))
    config = Workdir(str(tmp_path)).config()
    assert "discriminator" not in config.control and "tensor" not in config.mesh
    assert config.discriminator.model.depths == [1, 1, 1]
    with pytest.raises(WorkdirError, match="has no config.json"):
        Workdir(str(tmp_path / "elsewhere")).config()


def test_write_config_keeps_an_earlier_different_one(tmp_path):
    wd = Workdir(str(tmp_path))
    wd.write_config('{"a": 1}')
    wd.write_config('{"a": 1}')
    assert not (tmp_path / "config.1.json").exists()
    wd.write_config('{"a": 2}')
    assert json.loads((tmp_path / "config.1.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 2}
