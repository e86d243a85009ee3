"""sdsup ControlNet (segmentation conditioner) against diffusers' ControlNetModel, conversion, hints.

Every PyTorch model is built from a config with random weights, and every
tensor is randomised, including the zero-initialised convs (hint conv_out,
controlnet_down_blocks, controlnet_mid_block): with them at zero every
residual would be 0 and the comparison meaningless.
"""

import dataclasses
import json
import os
import re

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F

from sdsup.convert.controlnet import (
    CONTROLNET_SEQUENCE_NAMES,
    ConversionError,
    controlnet_config_from_diffusers,
    controlnet_config_to_diffusers,
    controlnet_from_torch,
    controlnet_param_shapes,
    controlnet_to_torch,
    load_pretrained_controlnet,
    save_pretrained_controlnet,
    write_class_embedding_recipe,
)
from sdsup.convert.torch_layout import flatten, torch_key, torch_shape
from sdsup.convert.unet import unet_config_to_diffusers, unet_from_torch
from sdsup.models.controlnet import (
    STABLE_DIFFUSION_1_5_SEG,
    ControlNetConfig,
    ControlNetInitError,
    ControlNetModel,
    class_embedding_hint,
    colour_hint,
    controlnet_params_from_unet,
    dummy_inputs,
)
from sdsup.models.unet import STABLE_DIFFUSION_1_5, UNet2DConditionModel, UNetConfig, encoder_param_names

torch.set_num_threads(1)  # the CPU cores are shared with other test runs
ATOL = 1e-4

# Three tiny architectures, both encodings: 2 levels (1 resnet per block,
# conv-projection attention), 3 levels (linear projections, per-block heads,
# 2 transformer layers in one block, flip_sin_to_cos / freq_shift varied) and
# 4 SD-like levels.
CASES = {
    "colour_2lvl": ControlNetConfig(
        UNetConfig(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=24,
            attention_head_dim=2,
        ),
        layout_encoding="colour",
        conditioning_channels=3,
        conditioning_embedding_out_channels=(8, 16, 16, 32),
    ),
    "class_embedding_3lvl_linear": ControlNetConfig(
        UNetConfig(
            block_out_channels=(32, 48, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            norm_num_groups=8,
            norm_eps=1e-6,
            cross_attention_dim=20,
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 2, 1),
            use_linear_projection=True,
            flip_sin_to_cos=False,
            freq_shift=1,
        ),
        layout_encoding="class_embedding",
        conditioning_channels=12,
        conditioning_embedding_out_channels=(24, 16),
    ),
    "colour_4lvl_sd_like": ControlNetConfig(
        UNetConfig(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            norm_num_groups=16,
            cross_attention_dim=16,
            attention_head_dim=4,
        ),
        layout_encoding="colour",
        conditioning_channels=3,
    ),
}
LATENT = {"colour_2lvl": (8, 8), "class_embedding_3lvl_linear": (8, 12), "colour_4lvl_sd_like": (8, 8)}
BATCH, SEQ = 2, 5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random, O(1)-scaled activations; norms near 1 (but not 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("weight") and p.ndim > 1:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / fan_in**0.5)
            else:
                p.copy_(0.2 * noise)


def _numpy_sd(model: torch.nn.Module):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _inputs(name: str, cfg: ControlNetConfig):
    rng = np.random.default_rng(len(name))
    h, w = LATENT[name]
    k = cfg.hint_downsample
    sample = rng.standard_normal((BATCH, h, w, cfg.in_channels)).astype(np.float32)
    t = np.array([17.0, 640.0], np.float32)
    context = rng.standard_normal((BATCH, SEQ, cfg.cross_attention_dim)).astype(np.float32)
    if cfg.layout_encoding == "colour":
        cond = rng.uniform(0, 1, (BATCH, h * k, w * k, 3)).astype(np.float32)
    else:
        cond = rng.standard_normal((BATCH, h * k, w * k, cfg.conditioning_channels)).astype(np.float32)
    return sample, t, context, cond


class _Case:
    """Torch ControlNet + UNet with random weights, their Flax params, inputs; built once per config."""

    def __init__(self, name: str):
        self.name = name
        self.config = cfg = CASES[name]
        torch.manual_seed(0)
        self.torch_cn = diffusers.ControlNetModel(**controlnet_config_to_diffusers(cfg)).eval()
        _randomize(self.torch_cn, seed=len(name))
        self.params = controlnet_from_torch(_numpy_sd(self.torch_cn), cfg)
        self.inputs = _inputs(name, cfg)
        self._unet = None

    @property
    def unet(self):
        if self._unet is None:
            # The encoder config, normalised by ControlNetConfig, is a whole UNet (mirrored up blocks).
            unet_cfg = self.config.unet
            torch_unet = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(unet_cfg)).eval()
            _randomize(torch_unet, seed=1 + len(self.name))
            self._unet = (unet_cfg, torch_unet, unet_from_torch(_numpy_sd(torch_unet), unet_cfg))
        return self._unet

    def torch_residuals(self, scale: float = 1.0):
        sample, t, context, cond = self.inputs
        with torch.no_grad():
            down, mid = self.torch_cn(
                torch.from_numpy(_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context),
                torch.from_numpy(_nchw(cond)), conditioning_scale=scale, return_dict=False,
            )
        return down, mid

    def flax_residuals(self, scale: float = 1.0, params=None):
        sample, t, context, cond = self.inputs
        return _cn_apply(self.config, {"params": self.params if params is None else params},
                         sample, t, context, cond, scale)


# Tests compile with XLA's backend optimisations off: several times faster to
# compile on the shared CPUs, same float32 arithmetic to ~1e-6.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_COMPILED = {}


def _run(key, fn, *args):
    """fn(*args), jit-compiled once per key (same argument shapes every call)."""
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)
    return _COMPILED[key](*args)


def _cn_apply(cfg, variables, sample, t, context, cond, scale):
    model = ControlNetModel(cfg)
    return _run(("controlnet", cfg), model.apply, variables, sample, t, context, cond, scale)


def _unet_apply(unet_cfg, variables, sample, t, context, down=None, mid=None):
    model = UNet2DConditionModel(unet_cfg)
    if down is None:
        return _run(("unet", unet_cfg), model.apply, variables, sample, t, context)
    return _run(("unet+residuals", unet_cfg), model.apply, variables, sample, t, context, tuple(down), mid)


def _random_params(abstract, seed: int):
    """Random values in the (possibly boxed) structure of an abstract parameter tree."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)


_CASES = {}


def _case(name: str) -> _Case:
    if name not in _CASES:
        _CASES[name] = _Case(name)
    return _CASES[name]


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------
# Numerics against diffusers.


@pytest.mark.parametrize("name", list(CASES))
def test_residuals_match_diffusers(name):
    case = _case(name)
    cfg = case.config
    for scale in (1.0, 0.6):
        t_down, t_mid = case.torch_residuals(scale)
        f_down, f_mid = case.flax_residuals(scale)
        assert len(f_down) == len(t_down) == cfg.num_skips
        for i, (f, t) in enumerate(zip(f_down, t_down)):
            assert f.shape == _nhwc(t).shape, (i, f.shape, t.shape)
            assert float(np.abs(_nhwc(t)).max()) > 1e-2, "residual is ~0: the test would be vacuous"
            assert _max_diff(f, _nhwc(t)) <= ATOL, (scale, i, _max_diff(f, _nhwc(t)))
        assert _max_diff(f_mid, _nhwc(t_mid)) <= ATOL, (scale, _max_diff(f_mid, _nhwc(t_mid)))


@pytest.mark.parametrize("name", ["colour_2lvl", "class_embedding_3lvl_linear"])
def test_unet_plus_controlnet_matches_diffusers(name):
    case = _case(name)
    unet_cfg, torch_unet, unet_params = case.unet
    sample, t, context, _ = case.inputs
    t_down, t_mid = case.torch_residuals(0.8)
    with torch.no_grad():
        ref = torch_unet(
            torch.from_numpy(_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context),
            down_block_additional_residuals=t_down, mid_block_additional_residual=t_mid,
        ).sample
        plain = torch_unet(torch.from_numpy(_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context)).sample
    assert _max_diff(ref, plain) > 1e-2, "the residuals do not change the UNet output: vacuous"
    f_down, f_mid = case.flax_residuals(0.8)
    out = _unet_apply(unet_cfg, {"params": unet_params}, sample, t, context, f_down, f_mid)
    assert _max_diff(out, _nhwc(ref)) <= ATOL, _max_diff(out, _nhwc(ref))


def test_fresh_controlnet_leaves_unet_unchanged_bitwise():
    case = _case("colour_2lvl")
    cfg = case.config
    unet_cfg, _, unet_params = case.unet
    sample, t, context, cond = case.inputs
    model = ControlNetModel(cfg)
    fresh = nn.meta.unbox(_run(("init", cfg), model.init, jax.random.PRNGKey(2), sample, t, context, cond)["params"])
    cn_params = controlnet_params_from_unet(unet_params, fresh, cfg)
    down, mid = _cn_apply(cfg, {"params": cn_params}, sample, t, context, cond, 1.0)
    assert len(down) == cfg.num_skips
    for r in down + (mid,):
        assert not np.any(np.asarray(r)), "a fresh ControlNet must output exact zeros"
    alone = np.asarray(_unet_apply(unet_cfg, {"params": unet_params}, sample, t, context))
    fed = np.asarray(_unet_apply(unet_cfg, {"params": unet_params}, sample, t, context, down, mid))
    assert fed.tobytes() == alone.tobytes()


def test_unet_copy_rule():
    cfg = CASES["class_embedding_3lvl_linear"]
    sample, t, context, cond = (x[:1] for x in _inputs("class_embedding_3lvl_linear", cfg))
    abstract_unet = jax.eval_shape(UNet2DConditionModel(cfg.unet).init, jax.random.PRNGKey(0), sample, t, context)
    abstract_cn = jax.eval_shape(ControlNetModel(cfg).init, jax.random.PRNGKey(0), sample, t, context, cond)
    unet_params = _random_params(abstract_unet, seed=3)
    cn_boxed = _random_params(abstract_cn, seed=4)
    # Boxed (nn.Partitioned) and {'params'}-wrapped trees, as init returns them.
    out = controlnet_params_from_unet(unet_params, cn_boxed, cfg)
    assert set(out) == {"params"}
    assert all(isinstance(v, nn.Partitioned) for v in flatten(out["params"]).values())
    out = nn.meta.unbox(out["params"])
    un, cn = nn.meta.unbox(unet_params["params"]), nn.meta.unbox(cn_boxed["params"])
    assert set(out) == set(cn)
    encoder = set(encoder_param_names(cfg.unet))
    assert encoder < set(out)
    for name in out:
        # Encoder subtrees from the UNet; hint encoder and zero convs kept from the ControlNet.
        fo, fsrc = flatten(out[name]), flatten(un[name] if name in encoder else cn[name])
        assert set(fo) == set(fsrc), name
        for path in fo:
            assert np.asarray(fo[path]).tobytes() == np.asarray(fsrc[path]).tobytes(), (name, path)
    # New buffers, not aliases of the UNet's.
    assert out["conv_in"]["kernel"] is not un["conv_in"]["kernel"]
    # Unboxed and unwrapped works too.
    out2 = controlnet_params_from_unet(un, cn, cfg)
    assert out2["mid_block"]["resnets_0"]["conv1"]["kernel"].tobytes() == \
        un["mid_block"]["resnets_0"]["conv1"]["kernel"].tobytes()
    # A UNet whose encoder differs (9-channel inpainting conv_in) is refused, naming the parameter.
    inpaint = UNet2DConditionModel(dataclasses.replace(cfg.unet, in_channels=9))
    bad = jax.eval_shape(inpaint.init, jax.random.PRNGKey(0), jnp.zeros(sample.shape[:3] + (9,)), t, context)
    with pytest.raises(ControlNetInitError, match="conv_in/kernel"):
        controlnet_params_from_unet(_random_params(nn.meta.unbox(bad), 0), cn, cfg)


# ---------------------------------------------------------------------------
# Conversion.


@pytest.mark.parametrize("name", ["colour_2lvl", "class_embedding_3lvl_linear"])
def test_round_trip_bitwise(name):
    case = _case(name)
    cfg = case.config
    # Flax (random init, boxed) -> torch (strict load) -> Flax.
    abstract = jax.eval_shape(ControlNetModel(cfg).init, jax.random.PRNGKey(5), *dummy_inputs(cfg))
    fresh = nn.meta.unbox(_random_params(abstract, seed=5)["params"])
    sd = controlnet_to_torch({"params": fresh}, cfg)
    model = diffusers.ControlNetModel(**controlnet_config_to_diffusers(cfg))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    back = controlnet_from_torch(model.state_dict(), cfg)
    fa, fb = flatten(fresh), flatten(back)
    assert set(fa) == set(fb)
    for path in fa:
        assert np.asarray(fa[path]).tobytes() == np.asarray(fb[path]).tobytes(), path
        assert np.asarray(fa[path]).dtype == np.asarray(fb[path]).dtype
    # Torch -> Flax -> torch gives the original state dict exactly.
    sd0 = _numpy_sd(case.torch_cn)
    sd1 = controlnet_to_torch(case.params, cfg)
    assert set(sd0) == set(sd1)
    for k in sd0:
        assert sd0[k].tobytes() == sd1[k].tobytes(), k


def test_encoder_keys_are_the_unet_keys():
    case = _case("colour_2lvl")
    unet_cfg, torch_unet, _ = case.unet
    cn_keys = set(_numpy_sd(case.torch_cn))
    unet_keys = set(torch_unet.state_dict())
    encoder_keys = {k for k in unet_keys if not k.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))}
    assert encoder_keys < cn_keys
    extra = cn_keys - encoder_keys
    assert all(k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."))
               for k in extra), sorted(extra)


def test_conversion_errors_name_the_key():
    case = _case("colour_2lvl")
    cfg = case.config
    sd = _numpy_sd(case.torch_cn)
    missing = dict(sd)
    del missing["controlnet_down_blocks.2.weight"]
    with pytest.raises(ConversionError, match=re.escape("controlnet_down_blocks.2.weight")):
        controlnet_from_torch(missing, cfg)
    extra = dict(sd, **{"controlnet_down_blocks.99.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ConversionError, match=re.escape("controlnet_down_blocks.99.weight")):
        controlnet_from_torch(extra, cfg)
    shaped = dict(sd)
    shaped["controlnet_cond_embedding.blocks.1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError, match=re.escape("controlnet_cond_embedding.blocks.1.weight")):
        controlnet_from_torch(shaped, cfg)
    # A state dict for another hint encoder (class embedding width) is refused too.
    other = ControlNetConfig.from_unet(cfg.unet, "class_embedding", class_embedding_dim=12,
                                       conditioning_embedding_out_channels=(8, 32))
    with pytest.raises(ConversionError, match="controlnet_cond_embedding"):
        controlnet_from_torch(sd, other)
    params = dict(case.params)
    del params["controlnet_mid_block"]
    with pytest.raises(ConversionError, match="controlnet_mid_block"):
        controlnet_to_torch(params, cfg)


@pytest.mark.parametrize("name", ["colour_2lvl", "class_embedding_3lvl_linear"])
def test_export_loads_in_diffusers(tmp_path, name):
    case = _case(name)
    cfg = case.config
    directory = save_pretrained_controlnet(str(tmp_path / name), case.params, cfg)
    loaded = diffusers.ControlNetModel.from_pretrained(directory, local_files_only=True).eval()
    ref = _numpy_sd(case.torch_cn)
    got = _numpy_sd(loaded)
    assert set(ref) == set(got)
    for k in ref:
        assert ref[k].tobytes() == got[k].tobytes(), k
    assert loaded.config.conditioning_channels == cfg.conditioning_channels
    assert tuple(loaded.config.conditioning_embedding_out_channels) == cfg.conditioning_embedding_out_channels
    sample, t, context, cond = case.inputs
    with torch.no_grad():
        down, mid = loaded(torch.from_numpy(_nchw(sample)), torch.from_numpy(t), torch.from_numpy(context),
                           torch.from_numpy(_nchw(cond)), return_dict=False)
    f_down, f_mid = case.flax_residuals()
    assert max(_max_diff(f, _nhwc(d)) for f, d in zip(f_down, down)) <= ATOL
    assert _max_diff(f_mid, _nhwc(mid)) <= ATOL
    # Back into Flax: same config (layout encoding from config.json) and params.
    cfg2, params2 = load_pretrained_controlnet(directory)
    assert cfg2 == cfg
    assert cfg2.layout_encoding == cfg.layout_encoding
    assert controlnet_config_from_diffusers(dict(loaded.config)) == cfg
    for path, v in flatten(params2).items():
        assert v.tobytes() == np.asarray(flatten(case.params)[path]).tobytes(), path


# ---------------------------------------------------------------------------
# Config.


def test_config_round_trip_and_refusals():
    for cfg in CASES.values():
        d = controlnet_config_to_diffusers(cfg)
        assert controlnet_config_from_diffusers(d, layout_encoding=cfg.layout_encoding) == cfg
        assert controlnet_config_from_diffusers(d) == cfg  # inferred from the hint encoder
        diffusers.ControlNetModel.from_config(d)  # accepted as is (smallest case is built in other tests)
    cfg = CASES["colour_2lvl"]
    d = controlnet_config_to_diffusers(cfg)
    for key, value in [("controlnet_conditioning_channel_order", "bgr"), ("global_pool_conditions", True),
                       ("mid_block_type", "UNetMidBlock2D"), ("class_embed_type", "timestep"),
                       ("sample_size", 64)]:
        with pytest.raises(ValueError, match=key):
            controlnet_config_from_diffusers(dict(d, **{key: value}))
    with pytest.raises(ValueError, match="layers_per_block"):
        ControlNetConfig(dataclasses.replace(cfg.unet, layers_per_block=(1, 2)))
    with pytest.raises(ValueError, match="conditioning_channels must be 3"):
        ControlNetConfig(cfg.unet, "colour", 12, (16, 32, 96, 256))
    with pytest.raises(ValueError, match="downsamples 8x"):
        ControlNetConfig(cfg.unet, "colour", 3, (16, 32))
    with pytest.raises(ValueError, match="downsamples 2x"):
        ControlNetConfig(cfg.unet, "class_embedding", 768, (16, 32, 96, 256))
    with pytest.raises(ValueError, match="layout_encoding"):
        ControlNetConfig(cfg.unet, "onehot")
    aldm = ControlNetConfig.from_unet(STABLE_DIFFUSION_1_5, "class_embedding", class_embedding_dim=768)
    assert (aldm.conditioning_channels, aldm.conditioning_embedding_out_channels, aldm.hint_downsample) == (768, (512, 256), 2)
    # Another VAE downsampling factor: the default hint encoders are cut / extended to match.
    small = ControlNetConfig.from_unet(cfg.unet, "class_embedding", class_embedding_dim=12, vae_scale_factor=4)
    assert (small.conditioning_embedding_out_channels, small.hint_downsample) == ((512,), 1)
    big = ControlNetConfig.from_unet(cfg.unet, "class_embedding", class_embedding_dim=12, vae_scale_factor=16)
    assert big.conditioning_embedding_out_channels == (512, 256, 256)
    assert ControlNetConfig.from_unet(cfg.unet, vae_scale_factor=4).conditioning_embedding_out_channels == (16, 32, 96)
    assert controlnet_config_from_diffusers(controlnet_config_to_diffusers(small)) == small
    with pytest.raises(ValueError, match="no stride-2 hint encoder"):
        ControlNetConfig.from_unet(cfg.unet, "class_embedding", class_embedding_dim=12, vae_scale_factor=2)
    with pytest.raises(ValueError, match="downsamples 4x"):
        ControlNetConfig(cfg.unet, "colour", 3, (16, 32, 96, 256), vae_scale_factor=4)
    # The model refuses a hint of the wrong size, naming the expected shape.
    sample, t, context, cond = _inputs("colour_2lvl", cfg)
    with pytest.raises(ValueError, match="controlnet_cond must be"):
        jax.eval_shape(ControlNetModel(cfg).init, jax.random.PRNGKey(0), sample, t, context, cond[:, ::2, ::2])


# ---------------------------------------------------------------------------
# Conditioning tensors from label maps.


def test_colour_hint():
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, (2, 16, 24)).astype(np.int32)
    labels[0, :3, :5] = 255
    out = np.asarray(colour_hint(labels, palette, ignore_id=255))
    assert out.shape == (2, 16, 24, 3) and out.dtype == np.float32
    ref = palette[np.clip(labels, 0, 5)].astype(np.float32) / 255.0
    ref[labels == 255] = 0.0
    assert out.tobytes() == ref.tobytes()
    assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match=r"\[7\]"):
        colour_hint(np.full((1, 4, 4), 7, np.int32), palette, ignore_id=255)


def _recipe_function(directory: str):
    """The python code block of the README that write_class_embedding_recipe wrote, executed."""
    with open(os.path.join(directory, "README.md")) as f:
        readme = f.read()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    namespace = {}
    exec(code, namespace)  # noqa: S102 -- our own generated recipe
    return namespace["layout_to_controlnet_cond"]


def test_class_embedding_hint_matches_documented_torch_recipe(tmp_path):
    rng = np.random.default_rng(1)
    n, d, ignore = 7, 12, 255
    table = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, n, (3, 32, 40)).astype(np.int64)
    labels[labels == 3] = ignore
    paths = write_class_embedding_recipe(str(tmp_path), table, [f"class{i}" for i in range(n)], ignore_id=ignore)
    out = np.asarray(class_embedding_hint(labels, table, ignore_id=ignore))
    assert out.shape == (3, 8, 10, d) and out.dtype == np.float32
    # The README's PyTorch recipe (channel-first) gives the same tensor, bit for bit.
    recipe = _recipe_function(str(tmp_path))
    cond = recipe(torch.from_numpy(labels), str(tmp_path))
    assert tuple(cond.shape) == (3, d, 8, 10)
    assert _nhwc(cond).tobytes() == out.tobytes()
    # The rule, literally: labels[:, ::4, ::4] then the table, ignore -> 0.
    ids = labels[:, ::4, ::4]
    ref = np.where((ids == ignore)[..., None], 0.0, table[np.clip(ids, 0, n - 1)]).astype(np.float32)
    assert out.tobytes() == ref.tobytes()
    # ... which "nearest-exact" would NOT give (so the documented mode matters).
    exact = F.interpolate(torch.from_numpy(labels)[:, None].float(), size=(8, 10), mode="nearest-exact")[:, 0].long()
    assert not np.array_equal(exact.numpy(), ids)
    # Stored vectors and metadata.
    stored = safetensors.numpy.load_file(paths["weights"])["class_embeddings"]
    assert stored.tobytes() == table.tobytes()
    with open(paths["class_names"]) as f:
        assert json.load(f)[2] == "class2"
    # Under jit, out-of-range ids silently map to zero; eagerly they raise.
    bad = labels.copy()
    bad[0, 0, 0] = n + 5
    jitted = np.asarray(jax.jit(class_embedding_hint, static_argnums=2)(bad, table, ignore))
    assert not np.any(jitted[0, 0, 0])
    with pytest.raises(ValueError, match="outside"):
        class_embedding_hint(bad, table, ignore_id=ignore)
    with pytest.raises(ValueError, match="divisible by 4"):
        class_embedding_hint(labels[:, :30], table, ignore_id=ignore)


def test_class_embedding_hint_feeds_the_controlnet():
    """End to end: label map -> class_embedding_hint -> ControlNet at the matching resolution."""
    case = _case("class_embedding_3lvl_linear")
    cfg = case.config
    sample, t, context, _ = case.inputs
    h, w = LATENT["class_embedding_3lvl_linear"]
    table = np.random.default_rng(2).standard_normal((5, cfg.conditioning_channels)).astype(np.float32)
    labels = np.random.default_rng(3).integers(0, 5, (BATCH, 8 * h, 8 * w))
    cond = class_embedding_hint(labels, table, ignore_id=0)
    down, mid = _cn_apply(cfg, {"params": case.params}, sample, t, context, cond, 1.0)
    assert mid.shape[1:3] == (h // 4, w // 4)


# ---------------------------------------------------------------------------
# Stable Diffusion 1.5 size, abstractly.


def test_sd15_controlnet_parameter_count_and_keys():
    cfg = STABLE_DIFFUSION_1_5_SEG
    shapes = controlnet_param_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 361_279_120
    assert cfg.num_skips == 12
    assert sum(1 for p in shapes if p[0].startswith("controlnet_down_blocks_") and p[-1] == "kernel") == 12
    # Key names and shapes equal diffusers' (model built on the meta device: nothing allocated).
    with torch.device("meta"):
        ref = diffusers.ControlNetModel(**controlnet_config_to_diffusers(cfg))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {torch_key(p, CONTROLNET_SEQUENCE_NAMES): torch_shape(p[-1], s) for p, s in shapes.items()}
    assert ours == ref_shapes
