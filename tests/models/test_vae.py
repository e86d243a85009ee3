"""sdsup AutoencoderKL vs diffusers' AutoencoderKL, and weight conversion both ways."""

import functools
import json
import os

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from sdsup.convert.torch_layout import ConversionError, unflatten
from sdsup.convert.vae import (
    rename_legacy_attention_keys,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_torch,
    vae_param_shapes,
    vae_to_torch,
    vae_torch_shapes,
)
from sdsup.models.vae import STABLE_DIFFUSION_1_5, AutoencoderKL, DiagonalGaussian, VAEConfig

torch.set_num_threads(1)  # the CPU cores are shared with other test runs

# Distinct tiny configs: 2 and 3 levels, layers_per_block 1 and 2, latent 4 and
# 3, mid attention on and off, odd channel and group counts (9/27/15; 3 and 5 groups),
# quant convs on and off, in/out channel counts other than 3, non-square images.
CONFIGS = {
    "two_levels_attn": dict(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    ),
    "three_levels_no_attn_lpb2": dict(
        block_out_channels=(9, 18, 27), layers_per_block=2, latent_channels=3, norm_num_groups=3, sample_size=24,
        mid_block_add_attention=False, scaling_factor=0.5, shift_factor=0.1,
    ),
    "three_levels_no_quant_convs": dict(
        in_channels=4, out_channels=2, block_out_channels=(10, 15, 15), layers_per_block=1, latent_channels=4,
        norm_num_groups=5, sample_size=16, use_quant_conv=False, use_post_quant_conv=False, force_upcast=False,
    ),
}
# Flax-only options per config: mid attention through the default kernel and the chunked one.
FLAX_OPTIONS = {"two_levels_attn": {}, "three_levels_no_attn_lpb2": {},
                "three_levels_no_quant_convs": {"attention_impl": "chunked"}}
IMAGE_HW = {"two_levels_attn": (16, 16), "three_levels_no_attn_lpb2": (12, 20), "three_levels_no_quant_convs": (16, 8)}
TOL = 1e-4
# XLA's CPU compile time, not the tiny models' run time, dominates these tests on
# a shared 2-core machine; the LLVM backend's optimisation level changes no
# semantics, and dropping it roughly halves compile time.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _config(name: str, **flax_options) -> VAEConfig:
    flax_options = dict(FLAX_OPTIONS[name], **flax_options)
    return vae_config_from_diffusers(
        dict(CONFIGS[name], down_block_types=["DownEncoderBlock2D"] * len(CONFIGS[name]["block_out_channels"]),
             up_block_types=["UpDecoderBlock2D"] * len(CONFIGS[name]["block_out_channels"])),
        **flax_options,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random: diffusers leaves GroupNorm at (1, 0) and some biases
    at 0, which would hide a swapped or dropped scale/bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("weight"):
                p.copy_(noise / np.sqrt(p[0].numel()))
            else:
                p.copy_(0.2 * noise)


@functools.lru_cache(maxsize=None)
def _torch_model(name: str) -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**vae_config_to_diffusers(_config(name))).eval()
    _randomize(model, seed=len(name))
    return model


def _numpy_sd(model: torch.nn.Module):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(name: str, batch: int = 2) -> np.ndarray:
    h, w = IMAGE_HW[name]
    rng = np.random.default_rng(7)
    return rng.uniform(-1, 1, size=(batch, h, w, CONFIGS[name].get("in_channels", 3))).astype(np.float32)


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def _flax_fn(config: VAEConfig, helpers: bool = False):
    """One jitted function per config computing everything the tests compare (one compilation)."""
    model = AutoencoderKL(config)

    @_jit
    def run(variables, x, z, rng):
        post = model.apply(variables, x, method=model.encode)
        out = dict(
            post=post,
            kl=post.kl(),
            sample=post.sample(rng),
            eps=jax.random.normal(rng, post.mean.shape),
            decoded=model.apply(variables, z, method=model.decode),
            forward=model.apply(variables, x),
        )
        if helpers:
            latents = model.encode_to_latents(variables, x)
            out.update(
                latents=latents,
                latents_sampled=model.encode_to_latents(variables["params"], x, rng),  # bare tree accepted too
                decoded_latents=model.decode_latents(variables, latents),
            )
        return out

    return run


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_diffusers(name):
    config = _config(name)
    tmodel = _torch_model(name)
    variables = {"params": vae_from_torch(tmodel.state_dict(), config)}
    x = _images(name)
    with torch.no_grad():
        tpost = tmodel.encode(_nchw(x)).latent_dist
        z = np.random.default_rng(3).normal(size=tpost.mean.shape).astype(np.float32)  # NCHW
        tdec = tmodel.decode(torch.from_numpy(z)).sample
        tfwd = tmodel(_nchw(x)).sample
    rng = jax.random.PRNGKey(1)
    # The latent helpers are thin wrappers: checked on the configs whose scaling differs.
    helpers = name != "three_levels_no_quant_convs"
    out = _flax_fn(config, helpers)(variables, x, np.transpose(z, (0, 2, 3, 1)), rng)
    post = out["post"]
    assert isinstance(post, DiagonalGaussian)
    assert post.mean.shape == (2, IMAGE_HW[name][0] // config.downsample_factor,
                               IMAGE_HW[name][1] // config.downsample_factor, config.latent_channels)
    assert _max_diff(post.mean, _nhwc(tpost.mean)) <= TOL
    assert _max_diff(post.logvar, _nhwc(tpost.logvar)) <= TOL
    assert _max_diff(post.std, _nhwc(tpost.std)) <= TOL
    assert _max_diff(post.var, _nhwc(tpost.var)) <= TOL
    np.testing.assert_allclose(out["kl"], tpost.kl().numpy(), rtol=1e-4, atol=1e-3)
    assert out["decoded"].shape == (2, *IMAGE_HW[name], config.out_channels)
    assert _max_diff(out["decoded"], _nhwc(tdec)) <= TOL
    assert _max_diff(out["forward"], _nhwc(tfwd)) <= TOL
    # Signal is O(1), so the tolerance is meaningful.
    assert float(np.std(_nhwc(tdec))) > 0.1 and float(np.std(_nhwc(tpost.mean))) > 0.1

    # Posterior sampling and the latent-scaling helpers.
    np.testing.assert_allclose(out["sample"], post.mean + post.std * out["eps"], rtol=1e-6, atol=1e-6)
    assert np.array_equal(post.mode(), post.mean)
    if not helpers:
        return
    shift = config.shift_factor or 0.0
    np.testing.assert_allclose(out["latents"], (post.mean - shift) * config.scaling_factor, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["latents_sampled"], (out["sample"] - shift) * config.scaling_factor,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["decoded_latents"], out["forward"], atol=1e-4)


def test_posterior_clamp_kl_and_nll_match_diffusers():
    mean = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)), jnp.float32)
    logvar = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)) * 50, jnp.float32)
    post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    assert float(post.logvar.max()) <= 20.0 and float(post.logvar.min()) >= -30.0
    tpost = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(
        _nchw(np.concatenate([mean, logvar], axis=-1)))
    other = DiagonalGaussian(mean * 0.5, jnp.zeros_like(logvar))
    tother = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(
        _nchw(np.concatenate([mean * 0.5, np.zeros_like(logvar)], axis=-1)))
    np.testing.assert_allclose(post.kl(other), tpost.kl(tother).numpy(), rtol=1e-5)
    np.testing.assert_allclose(post.nll(mean), tpost.nll(_nchw(mean)).numpy(), rtol=1e-5)
    # A pytree: comes out of jit.
    out = jax.jit(lambda p: p)(post)
    assert isinstance(out, DiagonalGaussian)


def _random_flax_params(config: VAEConfig, seed: int):
    """A random value for every parameter (GroupNorm scale/bias included), without compiling an init."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in vae_param_shapes(config).items():
        value = rng.normal(size=shape).astype(np.float32)
        if path[-1] == "kernel":
            value /= np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.2 * value
        else:
            value *= 0.2
        flat[path] = value
    return unflatten(flat)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trips_are_bitwise(name):
    config = _config(name)
    # Flax -> PyTorch -> Flax.
    params = _random_flax_params(config, seed=len(name))
    back = vae_from_torch(vae_to_torch(params, config), config)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
    # PyTorch -> Flax -> PyTorch, exact current diffusers key names and shapes.
    sd = _numpy_sd(_torch_model(name))
    exported = vae_to_torch({"params": vae_from_torch(sd, config)}, config)
    assert set(exported) == set(sd)
    for key in sd:
        assert exported[key].shape == sd[key].shape and np.array_equal(exported[key], sd[key]), key


def test_export_loads_with_from_pretrained(tmp_path):
    name = "two_levels_attn"
    config = _config(name)
    params = _random_flax_params(config, seed=5)
    # What save_pretrained writes: config.json + diffusion_pytorch_model.safetensors.
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(dict(vae_config_to_diffusers(config), _class_name="AutoencoderKL"), f)
    safetensors.numpy.save_file(vae_to_torch(params, config),
                                os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
    loaded, info = diffusers.AutoencoderKL.from_pretrained(tmp_path, local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert vae_config_from_diffusers(dict(loaded.config)) == config
    variables = {"params": params}
    x = _images(name)
    with torch.no_grad():
        tpost = loaded.encode(_nchw(x)).latent_dist
        tfwd = loaded(_nchw(x)).sample
        z = tpost.mean
        tdec = loaded.decode(z).sample
    out = _flax_fn(config, True)(variables, x, _nhwc(z), jax.random.PRNGKey(0))
    assert _max_diff(out["post"].mean, _nhwc(tpost.mean)) <= TOL
    assert _max_diff(out["post"].logvar, _nhwc(tpost.logvar)) <= TOL
    assert _max_diff(out["decoded"], _nhwc(tdec)) <= TOL
    assert _max_diff(out["forward"], _nhwc(tfwd)) <= TOL


def _legacy(sd):
    """Current attention names -> the query/key/value/proj_attn of old SD checkpoints."""
    out = {}
    for key, value in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".mid_block.attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


def test_legacy_attention_names_are_accepted(tmp_path):
    name = "two_levels_attn"
    config = _config(name)
    sd = _numpy_sd(_torch_model(name))
    legacy = _legacy(sd)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert "decoder.mid_block.attentions.0.query.bias" in legacy
    assert set(rename_legacy_attention_keys(legacy)) == set(sd)
    a, b = vae_from_torch(sd, config), vae_from_torch(legacy, config)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(x, y)
    # diffusers renames them the same way when loading a single-file checkpoint.
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(dict(vae_config_to_diffusers(config), _class_name="AutoencoderKL"), f)
    safetensors.numpy.save_file(legacy, os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path, local_files_only=True)
    assert np.array_equal(loaded.state_dict()["encoder.mid_block.attentions.0.to_out.0.weight"].numpy(),
                          sd["encoder.mid_block.attentions.0.to_out.0.weight"])
    # Both spellings of one weight: ambiguous, refused.
    both = dict(sd, **{"encoder.mid_block.attentions.0.query.weight": sd["encoder.mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(ConversionError, match=r"encoder\.mid_block\.attentions\.0\.query\.weight"):
        vae_from_torch(both, config)


def test_conversion_errors_name_the_key():
    name = "three_levels_no_attn_lpb2"
    config = _config(name)
    sd = _numpy_sd(_torch_model(name))
    missing = dict(sd)
    del missing["decoder.up_blocks.1.resnets.2.norm2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys.*decoder\.up_blocks\.1\.resnets\.2\.norm2\.bias"):
        vae_from_torch(missing, config)
    unexpected = dict(sd, **{"encoder.mid_block.attentions.0.to_q.weight": np.zeros((27, 27), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected keys.*encoder\.mid_block\.attentions\.0\.to_q\.weight"):
        vae_from_torch(unexpected, config)  # this config has no mid attention
    bad = dict(sd, **{"quant_conv.weight": np.zeros((6, 6, 3, 3), np.float32)})
    with pytest.raises(ConversionError, match=r"'quant_conv\.weight' has shape \(6, 6, 3, 3\), expected \(6, 6, 1, 1\)"):
        vae_from_torch(bad, config)
    params = vae_from_torch(sd, config)
    del params["encoder"]["conv_out"]["bias"]
    with pytest.raises(ConversionError, match=r"missing parameters.*encoder/conv_out/bias"):
        vae_to_torch(params, config)
    # Another config's weights: every difference is reported.
    with pytest.raises(ConversionError, match=r"decoder\.up_blocks\.2"):
        vae_from_torch(sd, _config("three_levels_no_quant_convs"))


def test_config_round_trips_and_refuses_unsupported():
    for name in CONFIGS:
        config = _config(name)
        assert vae_config_from_diffusers(vae_config_to_diffusers(config), **FLAX_OPTIONS[name]) == config
        assert vae_config_from_diffusers(dict(_torch_model(name).config), **FLAX_OPTIONS[name]) == config
    sd15 = STABLE_DIFFUSION_1_5
    assert (sd15.block_out_channels, sd15.layers_per_block, sd15.latent_channels, sd15.norm_num_groups,
            sd15.sample_size, sd15.scaling_factor, sd15.shift_factor) == ((128, 256, 512, 512), 2, 4, 32, 512, 0.18215, None)
    # Absent keys mean diffusers' defaults, not SD's.
    assert vae_config_from_diffusers({}).block_out_channels == diffusers.AutoencoderKL().config.block_out_channels
    base = vae_config_to_diffusers(_config("two_levels_attn"))
    for key, value, pattern in (
        ("act_fn", "gelu", "act_fn"),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "down_block_types"),
        ("up_block_types", ["UpDecoderBlock2D"], "up_block_types has 1 entries"),
        ("norm_type", "spatial", "norm_type"),
        ("block_out_channels", [8, 18], "not divisible"),
    ):
        with pytest.raises(ValueError, match=pattern):
            vae_config_from_diffusers(dict(base, **{key: value}))
    with pytest.raises(ValueError, match="unknown Flax options"):
        vae_config_from_diffusers(base, attention="flash")
    # latents_mean/std (SDXL-style normalisation) round-trip and drive the helpers.
    cfg = vae_config_from_diffusers(dict(base, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0]))
    vae = AutoencoderKL(cfg)
    z = jnp.ones((1, 2, 2, 4))
    np.testing.assert_allclose(vae.scale_latents(z)[0, 0, 0], (1 - np.array([0.1, 0.2, 0.3, 0.4])) * cfg.scaling_factor
                               / np.array([1.0, 2.0, 3.0, 4.0]), rtol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z)), z, rtol=1e-6)
    diffusers.AutoencoderKL(**vae_config_to_diffusers(cfg))  # accepted by diffusers as is


def test_sd15_parameters_abstractly():
    config = STABLE_DIFFUSION_1_5
    model = AutoencoderKL(config)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    params = abstract["params"]
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(nn.meta.unbox(params)))
    assert count == 83_653_863
    # Every parameter carries logical axis names, one per dimension.
    boxed = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(b, nn.Partitioned) and len(b.names) == b.value.ndim for b in boxed)
    # Exact diffusers keys and shapes, checked against a meta-device (unallocated) diffusers model.
    with torch.device("meta"):
        tmodel = diffusers.AutoencoderKL(**vae_config_to_diffusers(config))
    assert vae_torch_shapes(config) == {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    # Shapes through the full model at SD resolution, abstractly.
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=model.encode), nn.meta.unbox(abstract), jnp.zeros((1, 512, 512, 3))
    )
    assert out.mean.shape == (1, 64, 64, 4)


def _primitives(jaxpr):
    """Names of all primitives in a (closed) jaxpr, nested ones included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    yield from _primitives(sub)


def test_decode_gradients_with_remat_match():
    name = "two_levels_attn"
    params = vae_from_torch(_torch_model(name).state_dict(), _config(name))
    latents = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
    target = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(2, 16, 16, 3)), jnp.float32)

    def loss_fn(config):
        vae = AutoencoderKL(config)

        def loss(p, z):
            return jnp.mean(jnp.square(vae.decode_latents(p, z) - target))

        return loss

    grads = {}
    for remat in (False, True):
        traced = _jit(jax.grad(loss_fn(_config(name, remat=remat)), argnums=(0, 1))).trace(params, latents)
        # Each decoder layer is a rematerialised region of the backward pass: mid block
        # (resnet, attention, resnet), per level layers_per_block + 1 resnets and, except on
        # the last level, an upsampler (the primitive is `remat2` in current JAX, `checkpoint`
        # in older ones).
        regions = [p for p in _primitives(traced.jaxpr) if p.startswith("remat") or p == "checkpoint"]
        levels, per_level = len(CONFIGS[name]["block_out_channels"]), CONFIGS[name]["layers_per_block"] + 1
        assert len(regions) == (3 + levels * per_level + levels - 1 if remat else 0)
        grads[remat] = traced.lower().compile()(params, latents)
    leaves = jax.tree_util.tree_leaves(grads[True])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.max(jnp.abs(grads[True][1]))) > 0
    for a, b in zip(jax.tree_util.tree_leaves(grads[False]), leaves):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_tracks_float32():
    name = "two_levels_attn"
    params = vae_from_torch(_torch_model(name).state_dict(), _config(name))
    x = _images(name)
    with torch.no_grad():
        ref = _nhwc(_torch_model(name)(_nchw(x)).sample)
    model = AutoencoderKL(_config(name, dtype="bfloat16"))
    mean, out = _jit(lambda v, x: (model.apply(v, x, method=model.encode).mean, model.apply(v, x)))(
        {"params": params}, x)
    assert mean.dtype == jnp.float32  # moments are float32 whatever the compute dtype
    assert out.dtype == jnp.bfloat16
    assert _max_diff(out, ref) < 0.1 * float(np.max(np.abs(ref)))
