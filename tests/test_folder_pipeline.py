"""The user's own labelled folder through the whole smoke pipeline: `--config.data.name=folder --config.data.path=DIR`.

The folder is written here in the documented layout (images/, labels/, classes.txt, a captions JSON):
32x64 pictures of a sky, a ground and a box on the left or right. Every stage runs on it, with the
folder's 3 classes reaching the models, the evaluation and the sampler. Like Cityscapes in ALDM's
protocol, training takes random 32x32 crops and the evaluation whole 32x64 frames
(`evaluate.full_frame`).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sdsup import inference, pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("sky", "grass", "box")
COLOURS = np.array([(90, 150, 230), (60, 170, 70), (200, 60, 40)], np.uint8)


def _write_folder(root, n=48, size=32):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    captions = {}
    for i in range(n):
        ids = np.zeros((size, 2 * size), np.uint8)
        horizon = int(rng.integers(12, 20))
        ids[horizon:] = 1
        left = bool(i % 2)
        x0 = 4 if left else 2 * size - 14
        ids[horizon - 6:horizon + 4, x0:x0 + 10] = 2
        ids[0, 0] = 255  # an ignored pixel, as real label maps have
        image = COLOURS[np.minimum(ids, 2)] + rng.integers(0, 20, (*ids.shape, 3)).astype(np.uint8)
        stem = f"img_{i:03d}"
        Image.fromarray(image).save(os.path.join(root, "images", stem + (".png" if i % 3 else ".jpg")))
        Image.fromarray(ids).save(os.path.join(root, "labels", stem + ".png"))
        captions[stem] = f"sky over grass. a box on the {'left' if left else 'right'}."
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    with open(os.path.join(root, "captions.json"), "w") as f:
        json.dump(captions, f)


def _run(module, *args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    _write_folder(str(root / "mine"))
    wd = root / "wd"
    result = _run("sdsup.train", "--config=configs/scenes.py:smoke", f"--workdir={wd}", "--config.data.name=folder",
                  f"--config.data.path={root / 'mine'}", f"--config.data.captions={root / 'mine' / 'captions.json'}",
                  f"--config.data.data_dir={root / 'tfds'}", "--config.data.validation_fraction=0.25",
                  "--config.evaluate.split=validation", "--config.layout.eval_examples=8",
                  "--config.data.resize=(32, 64)", "--config.evaluate.full_frame=True")
    assert result.returncode == 0, result.stderr[-4000:]
    return wd


def test_every_stage_trains_on_the_folder(workdir):
    for stage in ("data", "vae", "ldm", "layout", "discriminator", "control", "evalseg", "evaluate"):
        assert (workdir / stage / "DONE.json").exists(), stage
    stats = json.loads((workdir / "data" / "stats.json").read_text())
    assert stats["dataset"] == "folder" and set(stats["splits"]["train"]["class_pixel_fraction"]) == set(CLASSES)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {f"images/control/iou/{c}" for c in CLASSES} <= set(metrics)
    assert 0.0 <= metrics["layout/miou_map/val"] <= 1.0 and 0.0 <= metrics["images/control/image_miou"] <= 1.0
    assert (workdir / "control" / "class_table.npy").exists()
    assert np.load(workdir / "control" / "class_table.npy").shape[0] == len(CLASSES)


def test_models_trained_on_square_crops_make_whole_frames(workdir):
    """What the full-frame evaluation relies on: the image generators sample any frame the VAE can tile."""
    session = inference.Session.from_workdir(str(workdir))
    settings = session.settings.with_overrides(steps=2)
    tokens = session.tokens("sky over grass. a box on the left.", 2)
    labels = np.zeros((2, 32, 64), np.uint8)
    labels[:, 16:] = 1
    frames = pipelines.layout_to_image(session.image_models(), tokens, labels, jax.random.PRNGKey(0), settings)
    assert frames.shape == (2, 32, 64, 3) and frames.dtype == np.uint8
    text_only = pipelines.text_to_image(session.image_models(), tokens, jax.random.PRNGKey(0), settings, size=(32, 64))
    assert text_only.shape == (2, 32, 64, 3)
    with pytest.raises(ValueError, match="multiples of the VAE's downsampling factor"):
        pipelines.text_to_image(session.image_models(), tokens, jax.random.PRNGKey(0), settings, size=(32, 63))


def test_sampling_a_folder_workdir_uses_its_classes(workdir, tmp_path):
    ids = np.zeros((32, 32), np.uint8)
    ids[16:] = 1
    np.save(tmp_path / "layout.npy", ids)
    result = _run("sdsup.sample", f"--workdir={workdir}", "--prompt=sky over grass. a box on the left.",
                  f"--out={tmp_path / 'out'}", f"--layout={tmp_path / 'layout.npy'}", "--steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "image_0.png").exists()
    np.save(tmp_path / "bad.npy", np.full((32, 32), 3, np.uint8))  # id 3: the folder has 3 classes
    bad = _run("sdsup.sample", f"--workdir={workdir}", "--prompt=sky.", f"--out={tmp_path / 'bad'}",
               f"--layout={tmp_path / 'bad.npy'}")
    assert bad.returncode != 0 and "outside the 3 classes" in bad.stderr.strip().splitlines()[-1]
