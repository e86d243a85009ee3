"""The tiny twins of configs/aldm.py: fixtures in each dataset's real layout, a random-weight SD pipeline and
segmenter checkpoints in their PyTorch formats, and `sdsup.train` on them (tests/test_real_configs.py,
tests/test_real_twins.py, tests/test_folder_twin.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from PIL import Image

from csail_reference import write_csail_files
from drn_reference import write_drn_file
from sd_helpers import TinyStableDiffusion
from sdsup import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(module, *args, timeout=900):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    env.pop("SDSUP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# Raw label values of the painted scenes: wall/building, sky, ground, ground (other kind), person.
RAW_VALUES = {"ade20k": (1, 3, 4, 6, 13), "cityscapes": (11, 23, 7, 8, 24), "folder": (1, 0, 2, 3, 4)}
GROUND = {"ade20k": ("floor", "road"), "cityscapes": ("road", "sidewalk"), "folder": ("floor", "rug")}
COLOURS = ((150, 120, 90), (90, 150, 230), (120, 100, 80), (110, 110, 110), (200, 60, 40))


def scene(name, i, rng, shape):
    """A painted picture and its raw label map: sky over a wall, a ground, a person."""
    wall, sky, ground, ground2, person = RAW_VALUES[name]
    h, w = shape
    label = np.full(shape, wall, np.uint8)
    label[: h // 3] = sky
    label[3 * h // 4:] = ground if i % 2 == 0 else ground2
    x0 = (4 * i) % (w - 12)
    label[h // 2: 7 * h // 8, x0:x0 + 10] = person
    image = np.zeros((*shape, 3), np.uint8)
    for value, colour in zip(RAW_VALUES[name], COLOURS):
        image[label == value] = colour
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    caption = f"a photo of a person next to a wall over a {GROUND[name][i % 2]}"
    return image, label, caption


def write_dataset(name, root):
    """The dataset's files in its shipped layout (extracted), and a captions JSON: (data.path, captions path)."""
    rng = np.random.default_rng(0)
    captions = {}

    def save(image, label, image_path, label_path):
        for path in (image_path, label_path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(image_path)
        Image.fromarray(label).save(label_path)

    for split, count in (("train", 8), ("val", 4)):
        for i in range(count):
            if name == "ade20k":
                sub = "training" if split == "train" else "validation"
                stem = f"ADE_{split}_{i + 1:08d}"
                image, label, captions[stem] = scene(name, i, rng, (40, 48))
                label[0, :4] = 0  # "other": ignored
                base = os.path.join(root, "ADEChallengeData2016")
                save(image, label, os.path.join(base, "images", sub, stem + ".jpg"),
                     os.path.join(base, "annotations", sub, stem + ".png"))
            elif name == "cityscapes":
                stem = f"aachen_{split}{i:02d}_000019"
                image, label, captions[stem] = scene(name, i, rng, (32, 64))
                label[-2:] = 1  # the ego vehicle: ignored
                save(image, label, os.path.join(root, "leftImg8bit", split, "aachen", stem + "_leftImg8bit.png"),
                     os.path.join(root, "gtFine", split, "aachen", stem + "_gtFine_labelIds.png"))
            else:
                stem = f"{split}_{i:03d}"
                image, label, captions[stem] = scene(name, i, rng, (40, 40))
                label[0, :4] = 255
                save(image, label, os.path.join(root, "images", stem + ".jpg"), os.path.join(root, "labels", stem + ".png"))
    if name == "folder":
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.write("sky\nwall\nfloor\nrug\nperson\n")
        os.makedirs(os.path.join(root, "splits"))
        for split in ("train", "validation"):
            with open(os.path.join(root, "splits", split + ".txt"), "w") as f:
                f.write("\n".join(s for s in captions if s.startswith(split[:3])) + "\n")
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
        json.dump(captions, f)
    return root, path


def import_tiny_sd(root):
    """A random-weight SD pipeline (diffusers' layout) under `root` and its `sdsup.convert import` directory."""
    sd = TinyStableDiffusion(root, image=32)
    imported = str(root / "sd15")
    result = cli("sdsup.convert", "import", f"--pretrained={sd.dir}", f"--out={imported}")
    assert result.returncode == 0, result.stderr[-3000:]
    return imported


def csail(root, name, num_classes, *flags):
    """A random CSAIL UperNet of the tiny configs' shape, written as mit_semseg's two files and converted."""
    tiny = config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), "ade20k,tiny").discriminator.model
    encoder, decoder = write_csail_files(str(root / f"csail_{name}"), num_classes, tiny.stem_channels,
                                         tiny.hidden_sizes, tiny.depths, tiny.head_channels, tiny.ppm_channels)
    out = str(root / name)
    result = cli("sdsup.convert", "csail", f"--encoder={encoder}", f"--decoder={decoder}", *flags, f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def scalars(stage_dir, tag):
    values = []
    for path in sorted(stage_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values.append(float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                                  else value.simple_value)
    return values


def run_twin(name, root, sd15, *flags):
    """`python -m sdsup.train --config=configs/aldm.py:NAME,tiny` on fixtures of the dataset under `root`, with the
    segmenters the real run would import (ADE20K: CSAIL's network as discriminator and evaluator; Cityscapes:
    ALDM's 20-row head and a DRN evaluator; folder: none, the discriminator stage pretrains). The workdir."""
    path, captions = write_dataset(name, str(root / "data"))
    if name == "ade20k":
        flags += (f"--config.control.discriminator_init={csail(root, 'discriminator', 150, '--fake_class')}",
                  f"--config.evalseg.pretrained={csail(root, 'evaluator', 150)}")
    elif name == "cityscapes":  # ALDM's 20-row head (19 classes + fake) sees [-1, 1] pixels
        d = csail(root, "discriminator", 20, "--image_mean=0.5,0.5,0.5", "--image_std=0.5,0.5,0.5")
        checkpoint = write_drn_file(str(root / "drn" / "drn_d_ms_cityscapes.pth"), (4, 8, 8, 8, 8, 8, 8, 8),
                                    (1,) * 8, 19)
        result = cli("sdsup.convert", "drn", f"--checkpoint={checkpoint}", f"--out={root / 'evaluator'}")
        assert result.returncode == 0, result.stderr[-3000:]
        flags += (f"--config.control.discriminator_init={d}", f"--config.evalseg.pretrained={root / 'evaluator'}")
    workdir = root / "wd"
    result = cli("sdsup.train", f"--config=configs/aldm.py:{name},tiny", f"--workdir={workdir}",
                 f"--config.pretrained={sd15}", f"--config.data.path={path}", f"--config.data.captions={captions}",
                 f"--config.data.data_dir={root / 'tfds'}", *flags)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


def check_control(workdir, name, cached=None):
    """What every twin's control stage must show: SD imported, the recipe's lambda_adv, the latent cache where
    the geometry allows one (`cached`; default: the config's), the adversarial branch taken."""
    done = {s: json.loads((workdir / s / "DONE.json").read_text()) for s in ("vae", "ldm", "control")}
    assert done["vae"]["pretrained"].endswith("sd15/vae") and done["ldm"]["pretrained"].endswith("sd15")
    assert done["control"]["lambda_adv"] == {"ade20k": 0.5, "cityscapes": 0.1, "folder": 0.5}[name]
    cached = name != "cityscapes" if cached is None else cached
    caches = list((workdir / "control" / "latent_cache").glob("*/manifest.json"))
    assert len(caches) == int(cached) and done["control"]["latent_cache"] == cached
    assert any(v > 0 for v in scalars(workdir / "control", "loss/adv"))  # the adversarial branch ran
    stats = json.loads((workdir / "data" / "stats.json").read_text())
    assert stats["dataset"] == name and stats["splits"]["train"]["examples"] == 8
    return done["control"]
