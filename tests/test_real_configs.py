"""configs/aldm.py: ALDM's recipe reaches the step, and its tiny twin runs the real path end to end.

The twin (`configs/aldm.py:ade20k,tiny`; tests/aldm_twin.py makes its files) runs the same code as the
full config: a random-weight Stable Diffusion pipeline saved by diffusers is imported (`python -m sdsup.convert import`), CSAIL UperNet
checkpoints are converted (`python -m sdsup.convert csail`, the discriminator with its "fake" row and
the evaluator without), ADE20K is built from files in ADEChallengeData2016's layout with a captions
JSON, and then data -> layout -> control (the adversarial branch taken) -> evalseg (the imported
evaluator) -> evaluate run, and the workdir is exported to a diffusers StableDiffusionControlNetPipeline
that loads with local_files_only=True and generates from a layout.
"""

import importlib.util
import json
import os

import diffusers
import numpy as np
import optax
import pytest
import torch

from aldm_twin import check_control, cli, import_tiny_sd, run_twin
from helpers import write_clip_tokenizer
from sdsup import aldm, config_lib
from sdsup.data import registry, tokenizers
from sdsup.models import clip_text, unet, vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """configs/aldm.py:ade20k,tiny end to end (tests/test_real_twins.py runs Cityscapes' and folder's)."""
    root = tmp_path_factory.mktemp("twin_ade20k")
    return {"name": "ade20k", "workdir": run_twin("ade20k", root, import_tiny_sd(root / "sd"))}


def test_the_tiny_twin_runs_every_stage_of_the_real_path(twin):
    workdir = twin["workdir"]
    for stage in ("data", "vae", "ldm", "layout", "control", "evalseg", "evaluate"):
        assert (workdir / stage / "DONE.json").exists(), stage
    control = check_control(workdir, "ade20k")
    assert control["discriminator_init"].endswith("discriminator")
    evalseg = json.loads((workdir / "evalseg" / "DONE.json").read_text())
    assert evalseg["pretrained"].endswith("evaluator") and 0.0 <= evalseg["val_miou_real"] <= 1.0
    assert json.loads((workdir / "evalseg" / "model" / "config.json").read_text())["kind"] == "segmenter"
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {"images/control/image_miou", "images/text_only/image_miou", "images/text_layout_image/image_miou",
            "layout/miou_map/val"} <= set(metrics)
    assert (workdir / "report.md").exists()


def test_the_tiny_twin_exports_to_a_diffusers_pipeline_that_generates(twin, tmp_path):
    out = tmp_path / "pipe"
    result = cli("sdsup.convert", "export", f"--from={twin['workdir']}", f"--out={out}")
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
