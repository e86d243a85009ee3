r"""ALDM on real data with Stable Diffusion 1.5: the paper's experiments, from local files.

`arg` is the dataset, optionally followed by ",tiny":
  ade20k        ADE20K (150 classes), 512x512, ALDM's ADE20K recipe
  cityscapes    Cityscapes (19 classes), 512x1024 resized, random 512x512 crops, whole-frame evaluation,
                ALDM's Cityscapes recipe
  folder        your own labelled folder (docs/data.md) with the ADE20K recipe
  <name>,tiny   the same code path at toy sizes: what tests/test_real_configs.py runs on fixtures and a
                random-weight Stable-Diffusion-shaped pipeline (never for results)

Before training (docs/real_data.md has every step):
  python -m sdsup.convert import --pretrained=/models/stable-diffusion-v1-5 --out=/models/sd15
  python -m sdsup.convert csail --encoder=encoder_epoch_50.pth --decoder=decoder_epoch_50.pth \
      --fake_class --out=/models/upernet101_ade_d     # ALDM's discriminator (151 outputs)
  python -m sdsup.convert csail --encoder=encoder_epoch_50.pth --decoder=decoder_epoch_50.pth \
      --out=/models/upernet101_ade                    # the ADE20K image-mIoU evaluator

Command (ADE20K):
  python -m sdsup.train --config=configs/aldm.py:ade20k --workdir=workdirs/aldm_ade20k \
      --config.pretrained=/models/sd15 \
      --config.data.path=/data/ade --config.data.captions=/data/ade20k_caption_train.json,/data/ade20k_caption_val.json \
      --config.control.discriminator_init=/models/upernet101_ade_d --config.evalseg.pretrained=/models/upernet101_ade
`config.pretrained` (the `sdsup.convert import` output) sets vae.pretrained, ldm.pretrained and
text.tokenizer_path together.

Sized for: ALDM trained on 2 GPUs x 4 images (global batch 8). On paper (bench/run.py
--only=sd15_aldm_step_on_paper) the step fits 16 GiB per chip on TPU v5e at 4 per chip.
Expected runtime: the paper's 200k (ADE20K) / 120k (Cityscapes) control steps; bench/bench_scale.py
projects the hours for a stated MFU. Target: the paper's Table 1 (Li et al., ICLR 2024; FID and mIoU
of ControlNet and ALDM per dataset); docs/real_data.md says which numbers could not be checked here.

ALDM's recipe (its released training scripts; facts in docs/real_data.md):
                                            ADE20K        Cityscapes
  global batch                              8             8
  generator AdamW lr (ControlNet, SD locked) 2e-5         1e-5
  segmenter AdamW lr, wd 0.005, one-cycle   1e-6          1e-6
  steps                                     200k          120k
  lambda_adv / fake-class weight            0.5 / 0.001   0.1 / 0.01
  adversarial ramp / segmenter from step    10k->15k / 5k 5k->10k / 0
  unrolled DDIM steps K on a 25 grid / lazy 9 / 8         9 / 8
  images                                    512x512       512x1024, random 512x512 crops
Layout encoding: each pixel's class -> the CLIP embedding of "A photo of {class}", a null vector for
ignore pixels, at 1/4 of the image size, through ALDM's hint block. Sampling: DDIM 25, eta 0,
guidance 7.5, negative prompt "", the layout in both branches of classifier-free guidance.
"""

import importlib.util
import os

from ml_collections import config_dict

DATASETS = ("ade20k", "cityscapes", "folder")

# ALDM's per-dataset numbers (its train_ade20k.sh / train_cityscapes.sh).
RECIPES = {
    "ade20k": dict(lr=2e-5, steps=200_000, lambda_adv=0.5, lambda_fake=0.001, ramp=(10_000, 15_000),
                   seg_start=5_000),
    "cityscapes": dict(lr=1e-5, steps=120_000, lambda_adv=0.1, lambda_fake=0.01, ramp=(5_000, 10_000),
                       seg_start=0),
}
RECIPES["folder"] = RECIPES["ade20k"]


def _scenes_config():
  """configs/scenes.py's full config: every key sdsup reads, overridden below where real data differs."""
  spec = importlib.util.spec_from_file_location("sdsup_configs_scenes",
                                                os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg: str = "ade20k"):
  name, _, size = arg.partition(",")
  if name not in DATASETS or size not in ("", "tiny"):
    raise ValueError(f"configs/aldm.py takes one of {DATASETS}, optionally ',tiny'; got {arg!r}")
  recipe = RECIPES[name]
  c = _scenes_config()
  c.seed = 777  # ALDM's scripts
  # No vae/ldm training: both come from Stable Diffusion (`pretrained`). The discriminator starts from the
  # imported CSAIL UperNet (control.discriminator_init); `folder` has none and pretrains one on its data.
  c.stages = ("data", "vae", "ldm", "layout", "control", "evalseg", "evaluate")
  if name == "folder":
    c.stages = ("data", "vae", "ldm", "layout", "discriminator", "control", "evalseg", "evaluate")

  # The `python -m sdsup.convert import` directory of a diffusers SD-1.5 copy; sets the three keys below.
  c.pretrained = config_dict.placeholder(str)
  pretrained = c.get_ref("pretrained")
  c.vae.pretrained = pretrained + "/vae"
  c.ldm.pretrained = pretrained
  c.text.tokenizer_path = pretrained + "/tokenizer"
  c.text.tokenizer = "clip"
  c.text.max_length = 77

  c.data.name = name
  c.data.image_size = 512
  c.data.resize = (512, 1024) if name == "cityscapes" else ()
  c.input.batch_size = 8
  c.input.num_workers = 8  # decode + Lanczos resize of 512 JPEGs in worker processes (docs/data.md, Throughput)
  c.input.prefetch = 2

  # Stable Diffusion 1.5's noise schedule (epsilon prediction), as its scheduler_config.json says.
  c.diffusion = config_dict.ConfigDict(dict(
      schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      prediction_type="epsilon"))
  c.sampling = config_dict.ConfigDict(dict(solver="ddim", steps=25, eta=0.0, guidance=7.5))

  # text -> layout at 64x64 (1/8 of 512) on SD's frozen CLIP text encoder. Sized for 150 classes, not tuned.
  c.layout.resolution = 64
  c.layout.embed_dim = 64
  c.layout.unet = config_dict.ConfigDict(dict(
      block_out_channels=(128, 256, 512),
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
      attention_head_dim=8, norm_num_groups=32, layers_per_block=2, remat=True))
  c.layout.train_text_encoder = False
  c.layout.num_steps = 100_000
  c.layout.batch_size = 64
  c.layout.optimizer = config_dict.ConfigDict(dict(
      lr=1e-4, schedule="warmup_cosine", warmup_steps=1000, weight_decay=0.01, grad_clip=1.0))
  c.layout.log_every = 100
  c.layout.checkpoint_every = 2000
  c.layout.eval_examples = 500
  c.layout.evaluate = True  # no planner here (the real datasets list no thing classes): these are the layouts used

  # The discriminator: CSAIL's UperNet-ResNet101 (deep stem 64-64-128, PPM 512, FPN 512: mit_semseg's
  # "upernet"), N + 1 outputs, as `python -m sdsup.convert csail` reads it from the checkpoint. `folder`
  # pretrains it on the user's data.
  c.discriminator.model = config_dict.ConfigDict(dict(
      style="csail", stem_channels=(64, 64, 128), hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 23, 3),
      layer_type="bottleneck", head_channels=512, ppm_channels=512, pool_scales=(1, 2, 3, 6)))
  c.discriminator.num_steps = 40_000
  c.discriminator.batch_size = 16
  c.discriminator.optimizer = config_dict.ConfigDict(dict(
      lr=2e-4, schedule="warmup_cosine", warmup_steps=1000, weight_decay=1e-4, grad_clip=1.0))
  c.discriminator.log_every = 100
  c.discriminator.checkpoint_every = 2000

  c.control.layout_encoding = "class_embedding"
  c.control.class_prompt = "A photo of {}"
  c.control.class_table_norm = "none"  # ALDM's raw CLIP vectors
  c.control.hint_channels = ()  # ALDM's hint block (768 -> 768 -> 512 -> 256/2 -> 256 -> 320)
  c.control.unet_trainable = "none"  # sd_locked
  c.control.num_steps = recipe["steps"]
  c.control.batch_size = 8
  # One example per device at a time at 512 (bench_scale: 29.7 GiB per chip with 1 micro-batch of 4).
  c.control.micro_batches = 1
  c.control.caption_dropout = 0.0  # ALDM trains on every caption (no unconditional dropout in its scripts)
  c.control.ema_decay = 0.9999
  c.control.lambda_adv = recipe["lambda_adv"]
  c.control.lambda_fake = recipe["lambda_fake"]
  c.control.n_lazy = 8
  c.control.grid_steps = 25
  c.control.unroll_steps = 9
  c.control.unroll_stride = 1
  c.control.ramp_start, c.control.ramp_end = recipe["ramp"]
  c.control.seg_start = recipe["seg_start"]
  c.control.discriminator_init = "stage" if name == "folder" else config_dict.placeholder(str)
  # torch's AdamW default weight decay 0.01 (ALDM builds the optimiser without setting it); no schedule.
  c.control.optimizer = config_dict.ConfigDict(dict(
      lr=recipe["lr"], schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=0.0))
  c.control.seg_optimizer = config_dict.ConfigDict(dict(
      lr=1e-6, schedule="one_cycle", warmup_steps=0, weight_decay=0.005, grad_clip=0.0))
  c.control.remat_discriminator = True
  c.control.discriminator_dtype = "bfloat16"
  # The frozen encoders run once (WORKDIR/control/latent_cache); Cityscapes' random crops have no fixed latents.
  c.control.latent_cache = name != "cityscapes"
  c.control.log_every = 100
  c.control.sample_every = 5000
  c.control.checkpoint_every = 5000
  c.control.keep_checkpoints = 3

  # The image-mIoU evaluator: the paper's (an imported CSAIL UperNet-R101 for ADE20K); `folder` trains one.
  c.evalseg.pretrained = config_dict.placeholder(str)
  c.evalseg.model = c.discriminator.model.copy_and_resolve_references()
  c.evalseg.num_steps = 40_000
  c.evalseg.batch_size = 16
  c.evalseg.optimizer = c.discriminator.optimizer.copy_and_resolve_references()
  c.evalseg.log_every = 100
  c.evalseg.checkpoint_every = 2000

  c.evaluate.split = "validation"  # the real datasets' test labels are not public
  c.evaluate.examples = 2000 if name == "ade20k" else 500
  c.evaluate.full_frame = name == "cityscapes"
  c.evaluate.fid_resize = "clean"  # ALDM computed FID with clean-fid
  c.preview_examples = 8

  if size == "tiny":
    _tiny(c, name)
  return c


def _tiny(c, name):
  """Toy sizes on the same code path: the networks' shapes come from the pretrained dirs the test writes."""
  c.data.image_size = 32
  c.data.resize = (32, 64) if name == "cityscapes" else ()
  c.data.missing_captions = "error"
  c.input.batch_size = 4
  c.input.num_workers = 0
  c.input.num_threads = 1
  c.text.max_length = 16
  c.sampling.steps = 4
  c.layout.resolution = 8
  c.layout.embed_dim = 8
  c.layout.unet = config_dict.ConfigDict(dict(
      block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, norm_num_groups=8,
      layers_per_block=1, remat=False))
  c.layout.num_steps = 4
  c.layout.batch_size = 4
  c.layout.optimizer.warmup_steps = 1
  c.layout.eval_examples = 4
  c.layout.eval_seeds = 1
  c.layout.sampling.steps = 2
  c.layout.log_every = 2
  tiny_segmenter = dict(style="csail", stem_channels=(8, 8, 16), hidden_sizes=(16, 16, 32, 32), depths=(1, 1, 1, 1),
                        layer_type="bottleneck", head_channels=16, ppm_channels=8, pool_scales=(1, 2, 3, 6))
  c.discriminator.model = config_dict.ConfigDict(tiny_segmenter)
  c.discriminator.num_steps = 4
  c.discriminator.batch_size = 4
  c.discriminator.optimizer.warmup_steps = 1
  c.discriminator.log_every = 2
  c.control.num_steps = 4
  c.control.batch_size = 4
  c.control.n_lazy = 2  # both branches of the step run
  c.control.grid_steps = 10
  c.control.unroll_steps = 2
  c.control.ramp_start, c.control.ramp_end = 0, 2
  c.control.seg_start = 0
  c.control.discriminator_dtype = "float32"
  c.control.log_every = 2
  c.control.sample_every = 0
  c.evalseg.model = config_dict.ConfigDict(tiny_segmenter)
  c.evalseg.num_steps = 4
  c.evalseg.batch_size = 4
  c.evalseg.optimizer.warmup_steps = 1
  c.evalseg.log_every = 2
  c.evaluate.examples = 4
  c.preview_examples = 2
  c.fast_compile = True
