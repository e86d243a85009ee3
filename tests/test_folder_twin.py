"""The tiny twin of configs/aldm.py:folder: the user's own labelled folder through ALDM's recipe.

The folder (images/, labels/, classes.txt, splits/, a captions JSON; tests/aldm_twin.py writes it) is
imported with a random-weight Stable Diffusion, the `discriminator` stage pretrains a CSAIL-style UperNet on
the folder's 5 classes and `control` starts from it, then layout, evalseg and evaluate run. Like Cityscapes
in ALDM's protocol, it trains on random 32x32 crops of 32x64 frames and evaluates whole frames
(`data.resize`, `evaluate.full_frame`; random crops have no fixed latents, so no latent cache). The ADE20K
twin (tests/test_real_configs.py) covers the latent cache and the diffusers export.
"""

import json

import jax
import numpy as np
import pytest

from aldm_twin import check_control, cli, import_tiny_sd, run_twin
from sdsup import inference, pipelines

CLASSES = ("sky", "wall", "floor", "rug", "person")
STAGES = ("data", "vae", "ldm", "layout", "discriminator", "control", "evalseg", "evaluate")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    return run_twin("folder", root, import_tiny_sd(root / "sd"), "--config.data.resize=(32, 64)",
                    "--config.evaluate.full_frame=True", "--config.control.latent_cache=False")


def test_every_stage_runs_on_the_folder(workdir):
    for stage in STAGES:
        assert (workdir / stage / "DONE.json").exists(), stage
    control = check_control(workdir, "folder", cached=False)
    assert control["discriminator_init"] == "stage"  # pretrained here on the folder, as ALDM starts from a trained one
    stats = json.loads((workdir / "data" / "stats.json").read_text())
    assert set(stats["splits"]["train"]["class_pixel_fraction"]) <= set(CLASSES)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {f"images/control/iou/{c}" for c in CLASSES} <= set(metrics)
    assert 0.0 <= metrics["images/control/image_miou"] <= 1.0 and 0.0 <= metrics["layout/miou_map/val"] <= 1.0
    # Real datasets' faithfulness: the classes a caption names ("a person next to a wall over a floor").
    assert metrics["images/ground_truth/faith/facts_checked"] > 0 and metrics["images/ground_truth/faith/facts"] > 0.9
    assert np.load(workdir / "control" / "class_table.npy").shape[0] == len(CLASSES)


def test_models_trained_on_square_crops_make_whole_frames(workdir):
    """What the whole-frame evaluation relies on: the image generators sample any frame the VAE can tile."""
    session = inference.Session.from_workdir(str(workdir))
    settings = session.settings.with_overrides(steps=2)
    tokens = session.tokens("a photo of a person next to a wall over a rug", 2)
    labels = np.zeros((2, 32, 64), np.uint8)
    labels[:, 16:] = 2
    frames = pipelines.layout_to_image(session.image_models(), tokens, labels, jax.random.PRNGKey(0), settings)
    assert frames.shape == (2, 32, 64, 3) and frames.dtype == np.uint8
    text_only = pipelines.text_to_image(session.image_models(), tokens, jax.random.PRNGKey(0), settings, size=(32, 64))
    assert text_only.shape == (2, 32, 64, 3)
    with pytest.raises(ValueError, match="multiples of the VAE's downsampling factor"):
        pipelines.text_to_image(session.image_models(), tokens, jax.random.PRNGKey(0), settings, size=(32, 63))


def test_sampling_a_folder_workdir_uses_its_classes(workdir, tmp_path):
    ids = np.zeros((32, 32), np.uint8)
    ids[16:] = 2
    np.save(tmp_path / "layout.npy", ids)
    result = cli("sdsup.sample", f"--workdir={workdir}", "--prompt=a person next to a wall over a rug",
                 f"--out={tmp_path / 'out'}", f"--layout={tmp_path / 'layout.npy'}", "--steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "image_0.png").exists()
    np.save(tmp_path / "bad.npy", np.full((32, 32), 5, np.uint8))  # id 5: the folder has 5 classes
    bad = cli("sdsup.sample", f"--workdir={workdir}", "--prompt=a wall.", f"--out={tmp_path / 'bad'}",
              f"--layout={tmp_path / 'bad.npy'}")
    assert bad.returncode != 0 and "outside the 5 classes" in bad.stderr.strip().splitlines()[-1]
