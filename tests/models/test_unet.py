"""UNet2DConditionModel and its layers against diffusers / PyTorch."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding

from sdsup.convert.torch_layout import ConversionError, flatten, flax_module_path, torch_key, torch_shape, unflatten
from sdsup.convert.unet import (
    UNET_SEQUENCE_NAMES,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_torch,
    unet_param_shapes,
    unet_to_torch,
)
from sdsup.models import layers
from sdsup.models.ops import attention as attention_ops
from sdsup.models.ops import conv as conv_ops
from sdsup.models.ops import norm as norm_ops
from sdsup.models.unet import STABLE_DIFFUSION_1_5, STABLE_DIFFUSION_2_1, UNet2DConditionModel, UNetConfig

# Tiny configurations that between them cover: 2, 3 and 4 resolution levels;
# conv and linear projections; int and per-block head counts; 1 and 2 layers
# per block; channel counts that are not powers of two (but divisible by the
# groups); both timestep-embedding conventions; spatial sizes that do not halve
# evenly (so the up path has to upsample to the skip's size).
_TWO_LEVELS = UNetConfig(
    block_out_channels=(24, 48),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=8,
)
CONFIGS = {
    "two_levels_conv_proj": (_TWO_LEVELS, (16, 16)),
    "four_levels_linear_proj_per_block_heads": (
        UNetConfig(
            block_out_channels=(20, 36, 44, 44),
            layers_per_block=1,
            cross_attention_dim=12,
            attention_head_dim=(2, 3, 4, 4),
            use_linear_projection=True,
            norm_num_groups=4,
        ),
        (8, 8),
    ),
    # Large enough (2 x 32 x 32 = 512 tiles of 2x2) for the level-0 3x3
    # convolutions to take the Winograd path on CPU (checked in the test).
    "two_levels_winograd": (dataclasses.replace(_TWO_LEVELS, block_out_channels=(32, 48)), (32, 32)),
    "three_levels_odd_sizes": (
        UNetConfig(
            block_out_channels=(24, 48, 72),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=20,
            attention_head_dim=3,
            norm_num_groups=6,
            norm_eps=1e-6,
            flip_sin_to_cos=False,
            freq_shift=1,
            in_channels=3,
            out_channels=5,
        ),
        (10, 14),
    ),
}


def _torch_unet(config: UNetConfig, seed: int = 0) -> TorchUNet:
    torch.manual_seed(seed)
    return TorchUNet(**unet_config_to_diffusers(config)).eval()


def _inputs(config: UNetConfig, size, batch=2, tokens=5, seed=0):
    rs = np.random.RandomState(seed)
    sample = rs.randn(batch, *size, config.in_channels).astype(np.float32)
    context = rs.randn(batch, tokens, config.cross_attention_dim).astype(np.float32)
    timesteps = np.array([3, 999][:batch] + [500] * max(0, batch - 2))
    return sample, timesteps, context


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def _skip_shapes(config: UNetConfig, size, batch):
    """NHWC shapes of the UNet's skip connections and of its mid block output."""
    h, w = size
    shapes = [(batch, h, w, config.block_out_channels[0])]
    for i, c in enumerate(config.block_out_channels):
        shapes += [(batch, h, w, c)] * config.layers(i)
        if i < len(config.block_out_channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, h, w, c))
    return shapes, (batch, h, w, config.block_out_channels[-1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name):
    config, size = CONFIGS[name]
    torch_model = _torch_unet(config)
    params = unet_from_torch(torch_model.state_dict(), config)
    model = UNet2DConditionModel(config)
    sample, timesteps, context = _inputs(config, size)
    skip_shapes, mid_shape = _skip_shapes(config, size, sample.shape[0])
    assert len(skip_shapes) == config.num_skips
    rs = np.random.RandomState(1)
    down_res = [rs.randn(*s).astype(np.float32) for s in skip_shapes]
    mid_res = rs.randn(*mid_shape).astype(np.float32)

    @jax.jit
    def both(params, down_res, mid_res):
        return (
            model.apply({"params": params}, sample, timesteps, context),
            model.apply({"params": params}, sample, timesteps, context, down_res, mid_res),
        )

    out, out_res = map(np.asarray, both(params, down_res, mid_res))
    with torch.no_grad():
        args = (_nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context))
        ref = _nhwc(torch_model(*args).sample)
        ref_res = _nhwc(
            torch_model(
                *args,
                down_block_additional_residuals=tuple(_nchw(r) for r in down_res),
                mid_block_additional_residual=_nchw(mid_res),
            ).sample
        )
    assert out.shape == (*sample.shape[:3], config.out_channels)
    if name == "two_levels_winograd":
        width = config.block_out_channels[0]
        level0 = (*sample.shape[:3], width)
        assert conv_ops.use_winograd(level0, (3, 3, width, width), sample.dtype, (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out_res, ref_res, atol=1e-4, rtol=0)
    # The residuals must matter, or the second comparison proves nothing.
    assert np.abs(out_res - out).max() > 1e-2


def test_gradients_match_diffusers():
    """Backward pass against PyTorch autograd: the custom VJPs of GroupNorm and
    of the chunked attention, under rematerialisation."""
    config, size = CONFIGS["two_levels_conv_proj"]
    config = dataclasses.replace(config, attention_impl="chunked", remat=True)
    torch_model = _torch_unet(config, seed=1)
    params = unet_from_torch(torch_model.state_dict(), config)
    sample, timesteps, context = _inputs(config, size)
    target = np.random.RandomState(2).randn(*sample.shape[:3], config.out_channels).astype(np.float32)
    model = UNet2DConditionModel(config)

    def loss(p, x, c):
        return jnp.mean(jnp.square(model.apply({"params": p}, x, timesteps, c) - target))

    grads, grad_x, grad_c = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, sample, context)
    x_t = _nchw(sample).requires_grad_(True)
    c_t = torch.from_numpy(context).requires_grad_(True)
    out = torch_model(x_t, torch.from_numpy(timesteps), c_t).sample
    torch.mean(torch.square(out - _nchw(target))).backward()

    def close(ours, theirs, what):
        scale = np.abs(theirs).max() + 1e-12
        err = np.abs(ours - theirs).max() / scale
        assert err < 1e-4, f"{what}: relative error {err:.2e}"

    close(np.asarray(grad_x), _nhwc(x_t.grad), "d sample")
    close(np.asarray(grad_c), c_t.grad.numpy(), "d context")
    ours = unet_to_torch(jax.tree.map(np.asarray, grads), config)
    theirs = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}
    assert set(ours) == set(theirs)
    for key in sorted(theirs):
        close(ours[key], theirs[key], key)


def test_bfloat16_compute():
    config, size = CONFIGS["two_levels_conv_proj"]
    torch_model = _torch_unet(config)
    params = unet_from_torch(torch_model.state_dict(), config)
    sample, timesteps, context = _inputs(config, size)
    model = UNet2DConditionModel(dataclasses.replace(config, dtype="bfloat16"))
    out = jax.jit(model.apply)({"params": params}, sample, timesteps, context)
    with torch.no_grad():
        ref = _nhwc(torch_model(_nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 3e-2, err


def test_flax_torch_flax_round_trip_is_bitwise():
    config, _ = CONFIGS["four_levels_linear_proj_per_block_heads"]
    rs = np.random.RandomState(3)
    # Random values of the model's exact parameter shapes (no compilation needed).
    params = unflatten({p: rs.randn(*s).astype(np.float32) for p, s in unet_param_shapes(config).items()})
    state = unet_to_torch({"params": params}, config)
    torch_model = _torch_unet(config)
    # strict=True: diffusers accepts exactly these keys and shapes.
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    back = unet_from_torch(torch_model.state_dict(), config)
    flat, flat_back = flatten(params), flatten(back)
    assert flat.keys() == flat_back.keys()
    for path, value in flat.items():
        assert value.dtype == flat_back[path].dtype
        np.testing.assert_array_equal(flat_back[path], value, err_msg="/".join(path))


def test_conversion_errors_name_the_key():
    config, _ = CONFIGS["two_levels_conv_proj"]
    state = {k: v.numpy() for k, v in _torch_unet(config).state_dict().items()}
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

    missing = dict(state)
    del missing[key]
    with pytest.raises(ConversionError, match="missing keys.*" + key.replace(".", r"\.")):
        unet_from_torch(missing, config)

    extra = dict(state, **{"mid_block.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected keys.*mid_block\.extra\.weight"):
        unet_from_torch(extra, config)

    wrong = dict(state, **{key: np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match=key.replace(".", r"\.") + r".*\(2, 2\)"):
        unet_from_torch(wrong, config)

    params = unet_from_torch(state, config)
    del params["conv_out"]["bias"]
    with pytest.raises(ConversionError, match="missing parameters.*conv_out/bias"):
        unet_to_torch(params, config)


def test_stable_diffusion_1_5_shapes_and_parameter_count():
    config = STABLE_DIFFUSION_1_5
    shapes = unet_param_shapes(config)  # jax.eval_shape: nothing is allocated
    assert sum(math.prod(s) for s in shapes.values()) == 859_520_964
    # Key for key and shape for shape what diffusers builds, on the meta device (no memory).
    with torch.device("meta"):
        torch_model = TorchUNet(**unet_config_to_diffusers(config))
    theirs = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    ours = {torch_key(p, UNET_SEQUENCE_NAMES): torch_shape(p[-1], s) for p, s in shapes.items()}
    assert ours == theirs
    # And diffusers' own config of the model reads back to the same UNetConfig.
    assert unet_config_from_diffusers(dict(torch_model.config)) == config


def test_config_round_trip_and_refusals():
    for config in (STABLE_DIFFUSION_1_5, STABLE_DIFFUSION_2_1, *(c for c, _ in CONFIGS.values())):
        assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config
    sd21 = dict(unet_config_to_diffusers(STABLE_DIFFUSION_2_1), _class_name="UNet2DConditionModel",
                _diffusers_version="0.8.0")
    sd21["attention_head_dim"] = list(sd21["attention_head_dim"])  # as in a config.json
    assert unet_config_from_diffusers(sd21, remat=True) == dataclasses.replace(STABLE_DIFFUSION_2_1, remat=True)
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers(dict(sd21, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="no_such_key"):
        unet_config_from_diffusers(dict(sd21, no_such_key=1))
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(block_out_channels=(30, 60, 90, 90))


def test_name_mapping():
    path = ("down_blocks_0", "attentions_1", "transformer_blocks_0", "ff", "net_2", "kernel")
    assert torch_key(path, UNET_SEQUENCE_NAMES) == "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2.weight"
    # A literal `_1` that is not a list index stays.
    assert torch_key(("time_embedding", "linear_1", "bias"), UNET_SEQUENCE_NAMES) == "time_embedding.linear_1.bias"
    assert flax_module_path("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0") == (
        "up_blocks_1",
        "attentions_0",
        "transformer_blocks_0",
        "attn1",
        "to_out_0",
    )


# ---------------------------------------------------------------------------
# Layers.


@pytest.mark.parametrize("dim", [32, 33, 320])
@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1), (True, 1.5)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    t = np.array([0, 1, 17.5, 250, 999], np.float32)
    ours = np.asarray(layers.timestep_embedding(jnp.asarray(t), dim, flip, shift))
    theirs = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    assert ours.shape == theirs.shape == (len(t), dim)
    # sin/cos of arguments up to ~1000 rad: one float32 ulp of the argument is 6e-5.
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[:3], theirs[:3], atol=2e-6, rtol=0)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
    "shape,groups,offset,spread,tol",
    [
        ((2, 8, 8, 48), 12, 0.3, 1.0, 2e-5),
        ((3, 5, 7, 20), 4, -1.0, 2.0, 2e-5),
        # mean/std = 1000: E[x^2] - E[x]^2 in float32 would lose the variance
        # entirely (errors of order 1); what remains is the rounding of the
        # mean itself, ulp(100) / 0.1 ~ 1e-4.
        ((2, 4, 4, 64), 32, 100.0, 0.1, 1e-3),
    ],
)
def test_group_norm_matches_torch(shape, groups, offset, spread, tol, silu):
    """Forward and backward against PyTorch in float64."""
    rs = np.random.RandomState(0)
    x = (rs.randn(*shape) * spread + offset).astype(np.float32)
    scale = (rs.rand(shape[-1]) + 0.5).astype(np.float32)
    bias = rs.randn(shape[-1]).astype(np.float32)
    cot = rs.randn(*shape).astype(np.float32)

    def ours(x, s, b):
        return norm_ops.group_norm(x, s, b, groups, 1e-5, silu)

    out, vjp = jax.vjp(ours, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    grads = vjp(jnp.asarray(cot))
    xt, st, bt = (torch.from_numpy(a).double().requires_grad_(True) for a in (_nchw(x).numpy(), scale, bias))
    ref = torch.nn.functional.group_norm(xt, groups, st, bt, 1e-5)
    if silu:
        ref = torch.nn.functional.silu(ref)
    ref.backward(_nchw(cot).double())
    np.testing.assert_allclose(np.asarray(out), _nhwc(ref), atol=tol, rtol=0)
    for ours_g, theirs_g in zip(grads, (_nhwc(xt.grad), st.grad.numpy(), bt.grad.numpy())):
        np.testing.assert_allclose(np.asarray(ours_g), theirs_g, atol=tol * np.abs(theirs_g).max(), rtol=0)


@pytest.mark.parametrize(
    "q_len,kv_len,block_q,group",
    [
        (64, 64, None, None),  # one block, all heads at once
        (50, 37, 16, 3),  # padded queries (50 -> 4 blocks of 13), heads in groups of 3
        (40, 7, 8, 2),  # cross-attention
    ],
)
def test_chunked_attention_matches_reference(q_len, kv_len, block_q, group):
    rs = np.random.RandomState(0)
    b, h, d = 2, 3, 8
    q = jnp.asarray(rs.randn(b, q_len, h, d).astype(np.float32) * 2)
    k = jnp.asarray(rs.randn(b, kv_len, h, d).astype(np.float32) * 2)
    v = jnp.asarray(rs.randn(b, kv_len, h, d).astype(np.float32))
    cot = jnp.asarray(rs.randn(b, q_len, h, d).astype(np.float32))

    def chunked(q, k, v):
        return attention_ops.chunked_attention(q, k, v, block_q=block_q, group=group)

    def reference(q, k, v):
        return attention_ops.attention(q, k, v, "xla")

    @jax.jit
    def run(q, k, v, cot):
        out, vjp = jax.vjp(chunked, q, k, v)
        ref, vjp_ref = jax.vjp(reference, q, k, v)
        others = [attention_ops.attention(q, k, v, impl) for impl in ("auto", "jax")]
        return out, ref, vjp(cot), vjp_ref(cot), others

    out, ref, grads, grads_ref, others = run(q, k, v, cot)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for a, r in zip(grads, grads_ref):
        np.testing.assert_allclose(a, r, atol=1e-5 * max(1.0, float(jnp.abs(r).max())), rtol=0)
    # Every implementation agrees, torch's included.
    for other in others:
        np.testing.assert_allclose(other, ref, atol=1e-5, rtol=0)
    heads_first = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy())
    torch_out = torch.nn.functional.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))
    np.testing.assert_allclose(torch_out.numpy().transpose(0, 2, 1, 3), ref, atol=1e-5, rtol=0)
