"""configs/aldm.py: ALDM's recipe reaches the step, and its tiny twin runs the real path end to end.

The twin (`configs/aldm.py:ade20k,tiny`) runs the same code as the full config: a random-weight Stable
Diffusion pipeline saved by diffusers is imported (`python -m sdsup.convert import`), CSAIL UperNet
checkpoints are converted (`python -m sdsup.convert csail`, the discriminator with its "fake" row and
the evaluator without), ADE20K is built from files in ADEChallengeData2016's layout with a captions
JSON, and then data -> layout -> control (the adversarial branch taken) -> evalseg (the imported
evaluator) -> evaluate run, and the workdir is exported to a diffusers StableDiffusionControlNetPipeline
that loads with local_files_only=True and generates from a layout.
"""

import importlib.util
import json
import os
import subprocess
import sys

import diffusers
import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
import torch
from PIL import Image

from csail_reference import write_csail_files
from drn_reference import write_drn_file
from helpers import write_clip_tokenizer
from sd_helpers import TinyStableDiffusion
from sdsup import aldm, config_lib, model_configs
from sdsup.data import registry, tokenizers
from sdsup.models import clip_text, unet, vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADE_VALUES = (1, 3, 4, 6, 13)  # wall, sky, floor, road, person (raw ids; 0 = "other" is ignored)


def _cli(module, *args, timeout=900):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    env.pop("SDSUP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("dataset, lr, steps, lambda_adv, lambda_fake, ramp, seg_start", [
    ("ade20k", 2e-5, 200_000, 0.5, 0.001, (10_000, 15_000), 5_000),
    ("cityscapes", 1e-5, 120_000, 0.1, 0.01, (5_000, 10_000), 0),
])
def test_the_papers_recipe_reaches_the_step(dataset, lr, steps, lambda_adv, lambda_fake, ramp, seg_start, tmp_path):
    """Every number of ALDM's table, read from the config by what builds the step (nothing is allocated)."""
    config = config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), dataset)
    config.pretrained = str(tmp_path / "sd15")
    config.control.discriminator_init = str(tmp_path / "d")
    config_lib.validate(config)
    spec = registry.for_config(config.data)
    tok = tokenizers.ClipTokenizer(write_clip_tokenizer(str(tmp_path / "tok")), config.text.max_length)
    text_config = clip_text.CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768,
                                           num_hidden_layers=12, num_attention_heads=12)
    table = np.zeros((spec.num_classes, 768), np.float32)
    setup = aldm.Setup(config, spec, tok, unet.STABLE_DIFFUSION_1_5, vae.STABLE_DIFFUSION_1_5, text_config, table)

    s = setup.settings
    assert (s.n_lazy, s.grid_steps, s.unroll_steps, s.unroll_stride) == (8, 25, 9, 1)
    assert s.lambda_fake == lambda_fake and (s.ramp_start, s.ramp_end) == ramp and s.seg_start == seg_start
    assert setup.step_constants()["lambda_adv"] == np.float32(lambda_adv)
    assert float(aldm.ramp(ramp[0], *ramp)) == 0.0 and float(aldm.ramp(ramp[1], *ramp)) == 1.0
    assert config.control.num_steps == steps and config.control.batch_size == 8 == config.input.batch_size
    # Generator: AdamW at a constant lr; segmenter: AdamW wd 0.005 on a one-cycle schedule peaking at 1e-6
    # over the updates it makes (lazy steps from seg_start on).
    assert float(setup.gen_schedule(0)) == pytest.approx(lr) and float(setup.gen_schedule(steps - 1)) == pytest.approx(lr)
    updates = setup.segmenter_updates(steps)
    assert updates == -(-steps // 8) - -(-seg_start // 8)
    lrs = np.array([float(setup.seg_schedule(i)) for i in np.linspace(0, updates, 41).astype(int)])
    assert lrs.max() == pytest.approx(1e-6, rel=1e-3) and lrs[0] < 1e-6 / 5 and lrs[-1] < 1e-6 / 100
    assert config.control.seg_optimizer.weight_decay == 0.005
    # Layout encoding, discriminator, sampling and geometry.
    assert setup.cn_config.layout_encoding == "class_embedding" and config.control.class_prompt == "A photo of {}"
    assert setup.cn_config.hint_downsample == 2  # ALDM's hint at 1/4 of the image: 128 -> 64 latents
    assert setup.seg_config.num_classes == spec.num_classes + 1 and setup.seg_config.style == "csail"
    assert config.control.unet_trainable == "none"  # sd_locked
    assert (config.sampling.steps, config.sampling.guidance, config.sampling.eta) == (25, 7.5, 0.0)
    assert config.data.image_size == 512
    assert tuple(config.data.resize) == ((512, 1024) if dataset == "cityscapes" else ())
    assert config.evaluate.full_frame == (dataset == "cityscapes")
    assert config.control.latent_cache == (dataset != "cityscapes")  # random crops have no fixed latents
    assert isinstance(setup.gen_tx, optax.GradientTransformation)


def test_a_real_config_names_what_it_still_needs():
    config = config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), "ade20k")
    with pytest.raises(config_lib.ConfigError, match=r"config.pretrained .*sdsup.convert import"):
        config_lib.validate(config)
    config.pretrained = "/models/sd15"
    with pytest.raises(config_lib.ConfigError, match=r"control.discriminator_init .*sdsup.convert csail"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="ade20k"):
        config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), "coco")
    config = config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), "cityscapes")
    config.pretrained, config.control.discriminator_init = "/models/sd15", "/models/d"
    config.control.latent_cache = True
    with pytest.raises(config_lib.ConfigError, match="control.latent_cache needs training without random crops"):
        config_lib.validate(config)


# ----------------------------------------------------------------------------------- the tiny twin
# Raw label values of the painted scenes: wall/building, sky, ground, ground (other kind), person.
RAW_VALUES = {"ade20k": (1, 3, 4, 6, 13), "cityscapes": (11, 23, 7, 8, 24), "folder": (1, 0, 2, 3, 4)}
GROUND = {"ade20k": ("floor", "road"), "cityscapes": ("road", "sidewalk"), "folder": ("floor", "rug")}
COLOURS = ((150, 120, 90), (90, 150, 230), (120, 100, 80), (110, 110, 110), (200, 60, 40))


def _scene(name, i, rng, shape):
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


def _write_dataset(name, root):
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
                image, label, captions[stem] = _scene(name, i, rng, (40, 48))
                label[0, :4] = 0  # "other": ignored
                base = os.path.join(root, "ADEChallengeData2016")
                save(image, label, os.path.join(base, "images", sub, stem + ".jpg"),
                     os.path.join(base, "annotations", sub, stem + ".png"))
            elif name == "cityscapes":
                stem = f"aachen_{split}{i:02d}_000019"
                image, label, captions[stem] = _scene(name, i, rng, (32, 64))
                label[-2:] = 1  # the ego vehicle: ignored
                save(image, label, os.path.join(root, "leftImg8bit", split, "aachen", stem + "_leftImg8bit.png"),
                     os.path.join(root, "gtFine", split, "aachen", stem + "_gtFine_labelIds.png"))
            else:
                stem = f"{split}_{i:03d}"
                image, label, captions[stem] = _scene(name, i, rng, (40, 40))
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


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A random-weight SD pipeline (diffusers' layout) and its `sdsup.convert import` directory."""
    root = tmp_path_factory.mktemp("sd")
    sd = TinyStableDiffusion(root, image=32)
    imported = str(root / "sd15")
    result = _cli("sdsup.convert", "import", f"--pretrained={sd.dir}", f"--out={imported}")
    assert result.returncode == 0, result.stderr[-3000:]
    return imported


def _csail(root, name, num_classes, *flags):
    """A random CSAIL UperNet of the tiny configs' shape, written as mit_semseg's two files and converted."""
    tiny = config_lib.load(os.path.join(ROOT, "configs", "aldm.py"), "ade20k,tiny").discriminator.model
    encoder, decoder = write_csail_files(str(root / f"csail_{name}"), num_classes, tiny.stem_channels,
                                         tiny.hidden_sizes, tiny.depths, tiny.head_channels, tiny.ppm_channels)
    out = str(root / name)
    result = _cli("sdsup.convert", "csail", f"--encoder={encoder}", f"--decoder={decoder}", *flags, f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=["ade20k", "cityscapes", "folder"])
def twin(request, sd15, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"twin_{name}")
    path, captions = _write_dataset(name, str(root / "data"))
    flags = []
    if name == "ade20k":  # CSAIL's ADE20K network: + "fake" for the discriminator, as it is for the evaluator
        flags += [f"--config.control.discriminator_init={_csail(root, 'discriminator', 150, '--fake_class')}",
                  f"--config.evalseg.pretrained={_csail(root, 'evaluator', 150)}"]
    elif name == "cityscapes":  # ALDM's 20-row head (19 classes + fake) that sees [-1, 1] pixels; DRN evaluates
        d = _csail(root, "discriminator", 20, "--image_mean=0.5,0.5,0.5", "--image_std=0.5,0.5,0.5")
        checkpoint = write_drn_file(str(root / "drn" / "drn_d_ms_cityscapes.pth"), (4, 8, 8, 8, 8, 8, 8, 8),
                                    (1,) * 8, 19)
        result = _cli("sdsup.convert", "drn", f"--checkpoint={checkpoint}", f"--out={root / 'evaluator'}")
        assert result.returncode == 0, result.stderr[-3000:]
        flags += [f"--config.control.discriminator_init={d}", f"--config.evalseg.pretrained={root / 'evaluator'}"]
    workdir = root / "wd"
    result = _cli("sdsup.train", f"--config=configs/aldm.py:{name},tiny", f"--workdir={workdir}",
                  f"--config.pretrained={sd15}", f"--config.data.path={path}", f"--config.data.captions={captions}",
                  f"--config.data.data_dir={root / 'tfds'}", *flags)
    assert result.returncode == 0, result.stderr[-5000:]
    return {"name": name, "workdir": workdir}


def _scalars(stage_dir, tag):
    values = []
    for path in sorted(stage_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values.append(float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                                  else value.simple_value)
    return values


def test_the_tiny_twin_runs_every_stage_of_the_real_path(twin):
    workdir = twin["workdir"]
    for stage in ("data", "vae", "ldm", "layout", "control", "evalseg", "evaluate"):
        assert (workdir / stage / "DONE.json").exists(), stage
    done = {s: json.loads((workdir / s / "DONE.json").read_text()) for s in ("vae", "ldm", "control", "evalseg")}
    assert done["vae"]["pretrained"].endswith("sd15/vae") and done["ldm"]["pretrained"].endswith("sd15")
    assert done["control"]["lambda_adv"] == {"ade20k": 0.5, "cityscapes": 0.1, "folder": 0.5}[twin["name"]]
    # The latent cache where the training geometry allows one (no random crops): computed once, then read.
    caches = list((workdir / "control" / "latent_cache").glob("*/manifest.json"))
    assert len(caches) == (0 if twin["name"] == "cityscapes" else 1)
    assert done["control"]["latent_cache"] == (twin["name"] != "cityscapes")
    if twin["name"] == "folder":  # no CSAIL network for the user's classes: the discriminator pretrains first
        assert (workdir / "discriminator" / "DONE.json").exists() and done["control"]["discriminator_init"] == "stage"
    else:  # the paper's evaluators, imported: CSAIL's UperNet (ADE20K), a DRN (Cityscapes)
        assert done["control"]["discriminator_init"].endswith("discriminator")
        assert done["evalseg"]["pretrained"].endswith("evaluator") and 0.0 <= done["evalseg"]["val_miou_real"] <= 1.0
        kind = json.loads((workdir / "evalseg" / "model" / "config.json").read_text())["kind"]
        assert kind == ("drn_segmenter" if twin["name"] == "cityscapes" else "segmenter")
    # The adversarial branch ran: its loss is logged and positive.
    assert any(v > 0 for v in _scalars(workdir / "control", "loss/adv"))
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {"images/control/image_miou", "images/text_only/image_miou", "layout/miou_map/val"} <= set(metrics)
    assert (workdir / "report.md").exists()
    stats = json.loads((workdir / "data" / "stats.json").read_text())
    assert stats["dataset"] == twin["name"] and stats["splits"]["train"]["examples"] == 8


@pytest.mark.parametrize("twin", ["ade20k"], indirect=True)  # one export covers the path: the conditioners are alike
def test_the_tiny_twin_exports_to_a_diffusers_pipeline_that_generates(twin, tmp_path):
    out = tmp_path / "pipe"
    result = _cli("sdsup.convert", "export", f"--from={twin['workdir']}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(str(out), local_files_only=True,
                                                                       safety_checker=None)
    spec = importlib.util.spec_from_file_location("layout_pipeline", out / "layout_pipeline.py")
    layout_pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout_pipeline)
    labels = np.zeros((1, 32, 32), np.int64)
    labels[:, 16:] = 3  # floor (class 3) under wall (class 0)
    images = layout_pipeline.generate(pipe, ["a photo of a room"], torch.from_numpy(labels), num_inference_steps=2,
                                      guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
