"""`python -m sdsup.convert import / export` against PyTorch diffusers, offline.

A tiny random Stable Diffusion + colour ControlNet pipeline is built with
diffusers/transformers and saved with save_pretrained (safetensors). Then:

  * import: each sdsup model reproduces its PyTorch model's forward pass;
  * export of the imported dir: from_pretrained(local_files_only=True)
    loads, every state dict is bitwise the original's, model_index.json is
    what diffusers itself writes, and -- what matters to users -- the
    exported PyTorch pipeline and sdsup's Flax models sample the same images
    from the same latents (DDIM, CFG, colour layout);
  * export of a training workdir (word-level tokenizer, class-embedding
    ControlNet): loads, the tokenizer gives sdsup's ids, the recipe files
    exist, and the shipped layout_pipeline.py samples what Flax samples;
  * errors: one line, no traceback, nothing in OUT deleted.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import traverse_util

from sd_helpers import TinyStableDiffusion
from sdsup.convert.__main__ import main as convert_main
from sdsup.convert.controlnet import controlnet_to_torch
from sdsup.convert.unet import unet_from_torch
from sdsup.data import registry
from sdsup.data.tokenizers import WordTokenizer
from sdsup.diffusion import samplers
from sdsup.diffusion.schedule import make_schedule
from sdsup.models import io as model_io
from sdsup.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from sdsup.models.controlnet import ControlNetConfig, ControlNetModel, class_embedding_hint, colour_hint
from sdsup.models.unet import UNet2DConditionModel, UNetConfig
from sdsup.models.vae import AutoencoderKL, VAEConfig

torch.set_num_threads(1)  # the CPU cores are shared with other test runs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL_MODEL = 1e-4
ATOL_IMAGE = 1e-3
IMAGE = 32  # pixels; the VAE downsamples 4x -> 8x8 latents
COMPONENTS = ("unet", "vae", "text_encoder", "controlnet")


# ---------------------------------------------------------------------------
# Helpers.


def _cli(*args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("SDSUP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sdsup.convert", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _cli_in_process(capsys, *args):
    """main(argv) in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = convert_main(list(args))
    return code, capsys.readouterr().err


def _sd(model: torch.nn.Module):
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _nchw(x) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))


def _nhwc(t) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# XLA's backend optimisations off: several times faster to compile on the
# shared CPUs, same float32 arithmetic to ~1e-6 (as tests/models do).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn):
    """jax.jit(fn), compiled with _FAST_COMPILE on first call."""
    compiled = {}

    def call(*args):
        if "f" not in compiled:
            compiled["f"] = jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)
        return compiled["f"](*args)

    return call


def _label_map(rng, batch, size, num_classes, ignore_id=None):
    """Blocky random class ids [B, size, size] (4x4 blocks), with a few ignore pixels."""
    coarse = rng.integers(0, num_classes, (batch, size // 4, size // 4))
    labels = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    if ignore_id is not None:
        labels[:, :4, :4] = ignore_id
    return labels.astype(np.int64)


PALETTE = np.array([[128, 64, 128], [70, 130, 180], [107, 142, 35], [220, 20, 60], [250, 170, 30]], np.uint8)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return TinyStableDiffusion(tmp_path_factory.mktemp("convert"), IMAGE)


@pytest.fixture(scope="module")
def imported(sd, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("imported") / "sdsup")
    result = _cli("import", f"--pretrained={sd.dir}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout
    return out


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exported") / "pipe")
    result = _cli("export", f"--from={imported}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    return out


# ---------------------------------------------------------------------------
# import


def test_help():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    assert "import" in result.stdout and "export" in result.stdout
    for cmd, flag in (("import", "--pretrained"), ("export", "--from")):
        r = _cli(cmd, "--help")
        assert r.returncode == 0 and flag in r.stdout


def test_import_writes_sdsup_dirs_and_manifest(sd, imported):
    manifest = json.load(open(os.path.join(imported, "manifest.json")))
    assert sorted(manifest["components"]) == sorted(COMPONENTS)
    assert sorted(manifest["copied"]) == ["scheduler", "tokenizer"]
    assert manifest["components"]["controlnet"]["layout_encoding"] == "colour"
    assert manifest["diffusion"] == {"schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                                     "beta_end": 0.012, "prediction_type": "epsilon"}
    for name in COMPONENTS:
        kind, config, params, _ = model_io.load(os.path.join(imported, name))
        assert kind == name
    for name in ("tokenizer", "scheduler"):
        src = sorted(os.listdir(os.path.join(sd.dir, name)))
        assert sorted(os.listdir(os.path.join(imported, name))) == src
    assert not [f for f in os.listdir(os.path.dirname(imported)) if "staging" in f]


def test_imported_models_reproduce_pytorch(sd, imported):
    rng = np.random.default_rng(0)
    load = {n: model_io.load(os.path.join(imported, n))[1:3] for n in COMPONENTS}
    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3.0, 700.0], np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    cond = rng.uniform(0, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)

    # ControlNet residuals, then the UNet with them.
    cn_cfg, cn_params = load["controlnet"]
    down, mid = _jit(ControlNetModel(cn_cfg).apply)({"params": cn_params}, sample, t, context, cond)
    unet_cfg, unet_params = load["unet"]
    unet = UNet2DConditionModel(unet_cfg)
    out = _jit(unet.apply)({"params": unet_params}, sample, t, context)
    out_res = _jit(unet.apply)({"params": unet_params}, sample, t, context, down, mid)
    with torch.no_grad():
        tdown, tmid = sd.controlnet(torch.from_numpy(_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context),
                                    torch.from_numpy(_nchw(cond)), return_dict=False)
        tout = sd.unet(torch.from_numpy(_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context)).sample
        tout_res = sd.unet(torch.from_numpy(_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context),
                           down_block_additional_residuals=tdown, mid_block_additional_residual=tmid).sample
    assert max(_diff(a, _nhwc(b)) for a, b in zip(down, tdown)) <= ATOL_MODEL
    assert _diff(mid, _nhwc(tmid)) <= ATOL_MODEL
    assert _diff(out, _nhwc(tout)) <= ATOL_MODEL
    assert _diff(out_res, _nhwc(tout_res)) <= ATOL_MODEL
    assert _diff(out_res, out) > 0.1  # the residuals matter

    # VAE: encode -> mode -> decode.
    vae_cfg, vae_params = load["vae"]
    x = rng.uniform(-1, 1, (1, IMAGE, IMAGE, 3)).astype(np.float32)
    rec = _jit(AutoencoderKL(vae_cfg).apply)({"params": vae_params}, x)
    with torch.no_grad():
        trec = sd.vae(torch.from_numpy(_nchw(x)), sample_posterior=False).sample
    assert _diff(rec, _nhwc(trec)) <= ATOL_MODEL
    assert vae_cfg.scaling_factor == 0.5

    # Text encoder on real token ids from the copied tokenizer.
    te_cfg, te_params = load["text_encoder"]
    ids = sd.tokenizer(["a photo of cat", "grass tree sky car"], padding="max_length", max_length=77,
                       return_tensors="np")["input_ids"]
    flax_out = _jit(CLIPTextTransformer(te_cfg).apply)({"params": te_params}, ids)
    with torch.no_grad():
        tref = sd.text_encoder(torch.from_numpy(ids))
    assert _diff(flax_out.last_hidden_state, tref.last_hidden_state.numpy()) <= ATOL_MODEL
    assert _diff(flax_out.pooled_output, tref.pooler_output.numpy()) <= ATOL_MODEL


def test_variant_and_bfloat16_weights(sd, tmp_path, capsys):
    """--variant reads *.VARIANT.safetensors where present (else the plain file); bf16 is cast to float32."""
    src = str(tmp_path / "sd_bf16")
    shutil.copytree(sd.dir, src)
    os.remove(os.path.join(src, "unet", "diffusion_pytorch_model.safetensors"))
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.unet.state_dict().items()}
    safetensors.torch.save_file(bf16, os.path.join(src, "unet", "diffusion_pytorch_model.bf16.safetensors"))
    out = str(tmp_path / "out")
    code, err = _cli_in_process(capsys, "import", f"--pretrained={src}", f"--out={out}", "--variant=bf16",
                                "--components=unet,vae")
    assert code == 0, err
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["components"]["unet"]["source"] == ["unet/diffusion_pytorch_model.bf16.safetensors"]
    assert manifest["components"]["unet"]["source_dtypes"] == ["bfloat16"]
    assert manifest["components"]["vae"]["source"] == ["vae/diffusion_pytorch_model.safetensors"]
    _, cfg, params, _ = model_io.load(os.path.join(out, "unet"))
    want = unet_from_torch({k: v.float() for k, v in bf16.items()}, cfg)
    got, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(want)
    assert set(got) == set(want)
    assert all(got[k].dtype == np.float32 and got[k].tobytes() == want[k].tobytes() for k in want)


# ---------------------------------------------------------------------------
# export of the imported dir


def test_export_loads_offline_and_is_bitwise(sd, exported):
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(exported, local_files_only=True)
    for name, original in sd.models.items():
        got, want = _sd(getattr(pipe, name)), _sd(original)
        assert set(got) == set(want), name
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), (name, k)
    # Each model alone, with the classes users name.
    for name, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
                      ("controlnet", diffusers.ControlNetModel), ("text_encoder", transformers.CLIPTextModel)):
        model = cls.from_pretrained(os.path.join(exported, name), local_files_only=True)
        assert set(_sd(model)) == set(_sd(sd.models[name])), name
    # model_index.json is what diffusers' own save_pretrained writes.
    ours = json.load(open(os.path.join(exported, "model_index.json")))
    theirs = json.load(open(os.path.join(sd.dir, "model_index.json")))
    assert ours == theirs
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
    assert public(pipe.scheduler.config) == public(sd.scheduler.config)
    assert os.path.isfile(os.path.join(exported, "README.md"))


def test_exported_pipeline_samples_the_same_images_as_flax(sd, imported, exported):
    """3 DDIM steps, CFG 4, colour layout: PyTorch pipeline call vs sdsup's Flax models and sampler."""
    steps, guidance, batch = 3, 4.0, 2
    prompts = ["a photo of cat", "sky over grass tree car"]
    rng = np.random.default_rng(1)
    labels = _label_map(rng, batch, IMAGE, len(PALETTE))
    hint = np.asarray(colour_hint(jnp.asarray(labels, jnp.int32), jnp.asarray(PALETTE)))  # [B, H, W, 3] in [0, 1]
    latents = rng.standard_normal((batch, IMAGE // 4, IMAGE // 4, 4)).astype(np.float32)

    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(exported, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        torch_images = pipe(prompts, image=torch.from_numpy(_nchw(hint)), height=IMAGE, width=IMAGE,
                            num_inference_steps=steps, guidance_scale=guidance,
                            latents=torch.from_numpy(_nchw(latents)), output_type="np").images

    # The same computation in Flax, from the imported sdsup dirs.
    (unet_cfg, unet_p), (cn_cfg, cn_p), (vae_cfg, vae_p), (te_cfg, te_p) = (
        model_io.load(os.path.join(imported, n))[1:3] for n in ("unet", "controlnet", "vae", "text_encoder"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, "tokenizer"), local_files_only=True)
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="np")["input_ids"]
    text = CLIPTextTransformer(te_cfg)
    cond = text.apply({"params": te_p}, tok(prompts)).last_hidden_state
    uncond = text.apply({"params": te_p}, tok([""])).last_hidden_state
    unet, controlnet, vae = UNet2DConditionModel(unet_cfg), ControlNetModel(cn_cfg), AutoencoderKL(vae_cfg)
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012, "epsilon")

    def model_fn(x, t, context, layout):
        down, mid = controlnet.apply({"params": cn_p}, x, t, context, layout)
        return unet.apply({"params": unet_p}, x, t, context, down, mid)

    @_jit
    def sample(latents, cond, uncond, hint):
        eps = samplers.classifier_free_guidance(model_fn, guidance, cond, uncond, layout=hint)
        z = samplers.ddim_sample(eps, schedule, latents, steps)
        x = vae.decode_latents({"params": vae_p}, z)
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

    flax_images = np.asarray(sample(latents, cond, uncond, hint))
    assert torch_images.shape == flax_images.shape == (batch, IMAGE, IMAGE, 3)
    inside = np.mean((torch_images > 0.01) & (torch_images < 0.99))
    assert inside > 0.5, f"only {inside:.0%} of pixels unclipped: the comparison would be weak"
    assert np.std(torch_images) > 0.02
    assert _diff(flax_images, torch_images) <= ATOL_IMAGE
    # The layout and the prompt both change the result a lot more than the tolerance.
    def final_latents(prompts, hint):
        with torch.no_grad():
            return pipe(prompts, image=torch.from_numpy(_nchw(hint)), height=IMAGE, width=IMAGE,
                        num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(_nchw(latents)),
                        output_type="latent").images.numpy()

    base = final_latents(prompts, hint)
    assert _diff(final_latents(prompts, hint[::-1].copy()), base) > 0.1
    assert _diff(final_latents(prompts[::-1], hint), base) > 0.5


# ---------------------------------------------------------------------------
# export of a training workdir (scenes: word tokenizer, class-embedding ControlNet)


def _random_params(init, seed):
    """Random params in the structure `init()` would give (abstractly evaluated: nothing compiles).

    Scaled like `_randomize`: kernels N(0, 1/fan_in), norm scales 1 + 0.2 N, embeddings 0.5 N,
    biases 0.2 N -- so the zero-initialised ControlNet convs are non-zero too.
    """
    abstract = nn.meta.unbox(jax.eval_shape(init)["params"])
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1] == "kernel":
            value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.2 * noise
        elif path[-1] == "embedding":
            value = 0.5 * noise
        else:
            value = 0.2 * noise
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("workdir") / "run")
    spec = registry.get("scenes")
    max_length = 16
    tok = WordTokenizer.scenes(max_length)
    text_cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=32, max_position_embeddings=max_length,
                              pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    vae_cfg = VAEConfig(block_out_channels=(16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE,
                        scaling_factor=0.8)
    unet_cfg = UNetConfig(sample_size=IMAGE // 4, block_out_channels=(16, 32),
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                          norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2)
    d = text_cfg.hidden_size
    cn_cfg = ControlNetConfig.from_unet(unet_cfg, "class_embedding", d, (16,), vae_scale_factor=4)
    key, latent = jax.random.PRNGKey(0), IMAGE // 4
    vae_p = _random_params(lambda: AutoencoderKL(vae_cfg).init(key, jnp.zeros((1, IMAGE, IMAGE, 3))), 1)
    vae_p["decoder"]["conv_out"]["kernel"] *= 0.3  # decoded images mostly inside [-1, 1]
    text_p = _random_params(lambda: CLIPTextTransformer(text_cfg).init(key, jnp.zeros((1, max_length), jnp.int32)), 2)
    unet_p = _random_params(lambda: UNet2DConditionModel(unet_cfg).init(
        key, jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, d))), 3)
    cn_p = _random_params(lambda: ControlNetModel(cn_cfg).init_params(key, latent_size=latent), 4)
    models = {"vae/model": ("vae", vae_cfg, vae_p), "ldm/text_encoder": ("text_encoder", text_cfg, text_p),
              "ldm/unet": ("unet", unet_cfg, unet_p), "control/controlnet": ("controlnet", cn_cfg, cn_p)}
    for rel, (kind, cfg, params) in models.items():
        model_io.save(os.path.join(root, rel), kind, cfg, params)
    table = np.random.default_rng(5).standard_normal((spec.num_classes, d)).astype(np.float32)
    np.save(os.path.join(root, "control", "class_table.npy"), table)
    config = {
        "stages": ["data", "vae", "ldm", "control"],
        "data": {"name": "scenes", "image_size": IMAGE},
        "text": {"tokenizer": "scenes_words", "tokenizer_path": None, "max_length": max_length},
        "diffusion": {"schedule": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                      "prediction_type": "epsilon"},
        "sampling": {"steps": 3, "eta": 0.0, "guidance": 3.0},
        "control": {"layout_encoding": "class_embedding", "class_prompt": "{}", "conditioning_scale": 1.0},
    }
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    return {"dir": root, "tok": tok, "spec": spec, "table": table, "models": models}


def test_export_from_workdir(workdir, tmp_path, capsys):
    out = str(tmp_path / "scenes_pipe")
    code, err = _cli_in_process(capsys, "export", f"--from={workdir['dir']}", f"--out={out}")
    assert code == 0, err
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    # Weights: bitwise the sdsup params (through the converters), D-channel hint.
    assert pipe.controlnet.config.conditioning_channels == 32
    assert pipe.vae_scale_factor == 4
    cn_kind, cn_cfg, cn_params = workdir["models"]["control/controlnet"]
    want = controlnet_to_torch(cn_params, cn_cfg)
    got = _sd(pipe.controlnet)
    assert set(got) == set(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)
    sched = pipe.scheduler.config
    assert (type(pipe.scheduler).__name__, sched.beta_schedule, sched.beta_start, sched.steps_offset,
            sched.set_alpha_to_one, sched.clip_sample) == ("DDIMScheduler", "linear", 0.0001, 1, False, False)

    # The recipe and the tokenizer story.
    for rel in ("controlnet/README.md", "controlnet/class_embeddings.safetensors", "controlnet/class_names.json",
                "layout_pipeline.py", "tokenizer/vocab.txt", "README.md"):
        assert os.path.isfile(os.path.join(out, rel)), rel
    assert json.load(open(os.path.join(out, "controlnet", "class_names.json"))) == list(workdir["spec"].class_names)
    readme = open(os.path.join(out, "README.md")).read()
    assert "WordTokenizer" in readme and "use_attention_mask" in readme
    assert pipe.text_encoder.config.use_attention_mask is True
    tok = workdir["tok"]
    captions = ["Sky over grass with a lake on the left.", "A big red car left of the tree.", "",
                "sky over sand, with mountains on the horizon and a road along the bottom. a sun at the top.",
                "unknownword 42 !"]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True)["input_ids"]
    assert [list(r) for r in ids] == [tok.encode(c).tolist() for c in captions]

    # layout_pipeline.generate (PyTorch) vs the same sampling in Flax.
    spec = importlib.util.spec_from_file_location("layout_pipeline", os.path.join(out, "layout_pipeline.py"))
    layout_pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout_pipeline)
    rng = np.random.default_rng(2)
    prompts = captions[:2]
    labels = _label_map(rng, 2, IMAGE, workdir["spec"].num_classes, ignore_id=workdir["spec"].ignore_id)
    latents = rng.standard_normal((2, IMAGE // 4, IMAGE // 4, 4)).astype(np.float32)
    torch_images = layout_pipeline.generate(pipe, prompts, torch.from_numpy(labels), num_inference_steps=3,
                                            guidance_scale=3.0, latents=torch.from_numpy(_nchw(latents)))

    (_, vae_cfg, vae_p), (_, te_cfg, te_p), (_, unet_cfg, unet_p) = (
        workdir["models"][k] for k in ("vae/model", "ldm/text_encoder", "ldm/unet"))
    text = CLIPTextTransformer(te_cfg)
    encode = lambda t: text.apply({"params": te_p}, t, attention_mask=t != tok.pad_id).last_hidden_state
    cond, uncond = encode(tok.encode_batch(prompts)), encode(tok.encode_batch([""]))
    hint = class_embedding_hint(jnp.asarray(labels, jnp.int32), workdir["table"], workdir["spec"].ignore_id)
    unet, controlnet, vae = UNet2DConditionModel(unet_cfg), ControlNetModel(cn_cfg), AutoencoderKL(vae_cfg)
    schedule = make_schedule("linear", 1000, 0.0001, 0.02, "epsilon")

    def model_fn(x, t, context, layout):
        down, mid = controlnet.apply({"params": cn_params}, x, t, context, layout)
        return unet.apply({"params": unet_p}, x, t, context, down, mid)

    @_jit
    def sample(latents, cond, uncond, hint):
        eps = samplers.classifier_free_guidance(model_fn, 3.0, cond, uncond, layout=hint)
        x = vae.decode_latents({"params": vae_p}, samplers.ddim_sample(eps, schedule, latents, 3))
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

    flax_images = np.asarray(sample(latents, cond, uncond, hint))
    assert torch_images.shape == flax_images.shape == (2, IMAGE, IMAGE, 3)
    assert np.mean((torch_images > 0.01) & (torch_images < 0.99)) > 0.5
    assert _diff(flax_images, torch_images) <= ATOL_IMAGE

    # The export imports back (class-embedding recipe and use_attention_mask carried) and re-exports identically.
    reimported, reexported = str(tmp_path / "reimported"), str(tmp_path / "reexported")
    code, err = _cli_in_process(capsys, "import", f"--pretrained={out}", f"--out={reimported}")
    assert code == 0, err
    manifest = json.load(open(os.path.join(reimported, "manifest.json")))
    assert manifest["components"]["controlnet"]["layout_encoding"] == "class_embedding"
    assert manifest["components"]["text_encoder"]["use_attention_mask"] is True
    code, err = _cli_in_process(capsys, "export", f"--from={reimported}", f"--out={reexported}")
    assert code == 0, err
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "controlnet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "controlnet/class_embeddings.safetensors"):
        a, b = (safetensors.numpy.load_file(os.path.join(d, rel)) for d in (out, reexported))
        assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a), rel
    for rel in ("model_index.json", "text_encoder/config.json", "controlnet/class_names.json",
                "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert json.load(open(os.path.join(out, rel))) == json.load(open(os.path.join(reexported, rel))), rel


def test_workdir_without_controlnet_exports_a_plain_pipeline(workdir, tmp_path, capsys):
    src = str(tmp_path / "run")
    shutil.copytree(workdir["dir"], src, ignore=shutil.ignore_patterns("controlnet", "class_table.npy"))
    out = str(tmp_path / "plain")
    code, err = _cli_in_process(capsys, "export", f"--from={src}", f"--out={out}")
    assert code == 0, err
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == "StableDiffusionPipeline"
    assert pipe.tokenizer.model_max_length == 16


# ---------------------------------------------------------------------------
# Errors: one line, no traceback, nothing in OUT deleted.


def _one_line_error(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith(("import ", "copy ", "export "))]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_missing_dir_is_a_clear_error(tmp_path):
    result = _cli("import", f"--pretrained={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 1
    line = _one_line_error(result.stderr)
    assert str(tmp_path / "nope") in line
    assert not os.path.exists(tmp_path / "out")
    result = _cli("export", f"--from={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 1 and str(tmp_path / "nope") in _one_line_error(result.stderr)


def _copy_pipeline(sd, tmp_path):
    dst = str(tmp_path / "sd_copy")
    shutil.copytree(sd.dir, dst)
    return dst


def _existing_out(tmp_path):
    """An OUT holding files of its own (one inside a directory the import would write)."""
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "unet" / "keep.txt").write_text("mine too")
    return out


def _assert_untouched(out):
    assert sorted(os.listdir(out)) == ["keep.txt", "unet"]
    assert (out / "keep.txt").read_text() == "mine" and (out / "unet" / "keep.txt").read_text() == "mine too"
    assert not [f for f in os.listdir(out.parent) if "staging" in f]


def test_pickle_only_component_is_refused(sd, tmp_path, capsys):
    src = _copy_pipeline(sd, tmp_path)
    unet_dir = os.path.join(src, "unet")
    os.remove(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(unet_dir, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")  # never opened
    out = _existing_out(tmp_path)
    code, err = _cli_in_process(capsys, "import", f"--pretrained={src}", f"--out={out}", "--overwrite")
    assert code == 1
    line = _one_line_error(err)
    assert unet_dir in line and "pickle" in line and "diffusion_pytorch_model.bin" in line
    _assert_untouched(out)


def test_corrupt_safetensors_is_a_clear_error(sd, tmp_path, capsys):
    src = _copy_pipeline(sd, tmp_path)
    path = os.path.join(src, "vae", "diffusion_pytorch_model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    out = _existing_out(tmp_path)
    code, err = _cli_in_process(capsys, "import", f"--pretrained={src}", f"--out={out}", "--overwrite")
    assert code == 1
    line = _one_line_error(err)
    assert f"cannot read {path}" in line
    _assert_untouched(out)


def test_missing_component_and_non_empty_out(sd, tmp_path, capsys):
    src = _copy_pipeline(sd, tmp_path)
    shutil.rmtree(os.path.join(src, "text_encoder"))
    code, err = _cli_in_process(capsys, "import", f"--pretrained={src}", f"--out={tmp_path / 'new'}")
    assert code == 1 and "text_encoder" in _one_line_error(err)
    out = _existing_out(tmp_path)
    code, err = _cli_in_process(capsys, "import", f"--pretrained={sd.dir}", f"--out={out}")
    assert code == 1 and "not empty" in _one_line_error(err)
    _assert_untouched(out)
    code, err = _cli_in_process(capsys, "export", f"--from={sd.dir}", f"--out={tmp_path / 'x'}")
    assert code == 1 and "neither an imported directory" in _one_line_error(err)


def test_overwrite_replaces_only_written_entries(sd, tmp_path, capsys):
    out = _existing_out(tmp_path)
    code, err = _cli_in_process(capsys, "import", f"--pretrained={sd.dir}", f"--out={out}",
                                "--components=unet,scheduler", "--overwrite")
    assert code == 0, err
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["keep.txt", "manifest.json", "scheduler", "unet"]
    assert sorted(os.listdir(out / "unet")) == ["config.json", "params.safetensors"]
