"""sdsup CLIP vision tower vs transformers' CLIPVisionModelWithProjection, and weight conversion both ways."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sdsup.convert.clip_vision import (
    ClipConvertError,
    clip_vision_config_from_transformers,
    clip_vision_config_to_transformers,
    clip_vision_from_torch,
    clip_vision_to_torch,
)
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.clip_vision import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    CLIPVisionTransformer,
    dummy_pixels,
)

torch.set_num_threads(1)  # the CPU cores are shared with other test runs

# Distinct tiny configs: patch size (4, 5, 8), head count / head_dim, depth,
# activation, an odd hidden size (45 = 5 heads x 9), layer-norm eps and a
# non-RGB channel count (the patch conv's input width).
CONFIGS = {
    "quick_gelu_p4": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=4, projection_dim=12, hidden_act="quick_gelu",
    ),
    "gelu_odd_hidden_p5": dict(
        hidden_size=45, intermediate_size=50, num_hidden_layers=3, num_attention_heads=5, image_size=20,
        patch_size=5, projection_dim=20, hidden_act="gelu", layer_norm_eps=1e-6,
    ),
    "gelu_new_p8_one_layer_4ch": dict(
        hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=6, image_size=24,
        patch_size=8, projection_dim=8, hidden_act="gelu_new", num_channels=4,
    ),
}
TOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random and O(1)-scaled: CLIP's init leaves biases at 0 and
    layer norms at 1, which would hide a swapped or dropped bias/scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("layer_norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name and "patch" not in name:
                p.copy_(0.5 * noise)  # class and position embeddings
            elif name.endswith("weight"):
                p.copy_(noise / p[0].numel() ** 0.5)  # fan-in of a Linear row or a conv filter
            else:
                p.copy_(0.2 * noise)


def _torch_model(name: str):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CONFIGS[name])).eval()
    _randomize(model, seed=len(name))
    return model


def _numpy_sd(model: torch.nn.Module):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _pixels(name: str, batch: int = 3) -> np.ndarray:
    c = CONFIGS[name]
    rng = np.random.default_rng(7)
    # NHWC, roughly CLIP-normalised scale.
    return rng.standard_normal((batch, c["image_size"], c["image_size"], c.get("num_channels", 3))).astype(np.float32)


def _assert_close(flax_array, torch_tensor, what, tol=TOL):
    diff = float(np.max(np.abs(np.asarray(flax_array, np.float32) - torch_tensor.detach().numpy())))
    assert diff <= tol, f"{what}: max abs diff {diff}"
    return diff


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_transformers(name):
    tmodel = _torch_model(name)
    config = clip_vision_config_from_transformers(tmodel.config)
    variables = clip_vision_from_torch(_numpy_sd(tmodel), config, with_projection=True)
    pixels = _pixels(name)

    out = jax.jit(lambda v, x: CLIPVisionModelWithProjection(config).apply(v, x, output_hidden_states=True))(
        variables, pixels)
    nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = tmodel(nchw, output_hidden_states=True)
        pooled = tmodel.vision_model(nchw).pooler_output
    assert tmodel.config._attn_implementation == "sdpa"
    diffs = {
        "last_hidden_state": _assert_close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state"),
        "pooled_output": _assert_close(out.pooled_output, pooled, "pooled_output"),
        "image_embeds": _assert_close(out.image_embeds, ref.image_embeds, "image_embeds"),
    }
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _assert_close(a, b, f"hidden_states[{i}]")
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})  # measured max abs differences (pytest -s)

    # The bare tower's tree is the wrapped model's `vision_model` (converted with with_projection=False).
    bare = jax.eval_shape(CLIPVisionTransformer(config).init, jax.random.key(0), dummy_pixels(config))
    assert jax.tree.structure(nn.meta.unbox(bare)["params"]) == jax.tree.structure(
        clip_vision_from_torch(_numpy_sd(tmodel.vision_model), config)["params"])


def test_bfloat16_compute_tracks_float32_and_remat_is_per_layer():
    name = "gelu_odd_hidden_p5"
    tmodel = _torch_model(name)
    config = clip_vision_config_from_transformers(tmodel.config)
    variables = clip_vision_from_torch(_numpy_sd(tmodel), config, with_projection=True)
    pixels = _pixels(name)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
    model = CLIPVisionModelWithProjection(config, dtype=jnp.bfloat16)
    out = jax.jit(model.apply)(variables, pixels)
    assert out.image_embeds.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out.image_embeds, np.float32) - ref)
    # bf16 keeps ~3 significant digits through 3 layers of O(1) activations.
    assert err.max() < 0.05 * np.abs(ref).max(), (err.max(), np.abs(ref).max())

    # remat keeps the parameter names and checkpoints each layer (same graph otherwise).
    remat = CLIPVisionModelWithProjection(config, remat=True)
    jaxpr = jax.make_jaxpr(remat.apply)(variables, pixels)
    assert sum(e.primitive.name == "remat2" for e in jaxpr.eqns) == config.num_hidden_layers


def _random_boxed(config: CLIPVisionConfig, seed: int):
    """Init-shaped boxed params with random values, without compiling `init`."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(CLIPVisionModelWithProjection(config).init, jax.random.key(0), dummy_pixels(config))
    return jax.tree.map(
        lambda box: box.replace_boxed(rng.standard_normal(box.value.shape).astype(box.value.dtype)),
        abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trips_are_bitwise(name):
    config = CLIPVisionConfig(**CONFIGS[name])
    boxed = _random_boxed(config, seed=len(name))
    flax_params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))

    # Flax -> PyTorch -> Flax, with the projection: exactly the keys of transformers' model.
    sd = clip_vision_to_torch(boxed, config, with_projection=True)
    hf_config = transformers.CLIPVisionConfig(**clip_vision_config_to_transformers(config))
    tmodel = transformers.CLIPVisionModelWithProjection(hf_config)
    assert sd.keys() == tmodel.state_dict().keys()
    back = clip_vision_from_torch(sd, config, with_projection=True)
    assert jax.tree.structure(back) == jax.tree.structure(flax_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(flax_params)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)

    # The unprefixed tower export is transformers 5's CLIPVisionModel state_dict:
    # strict load, then PyTorch -> Flax -> PyTorch is bitwise too.
    bare = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip_vision_config_to_transformers(config)))
    tower = {"params": back["params"]["vision_model"]}
    bare.load_state_dict({k: torch.from_numpy(v) for k, v in clip_vision_to_torch(tower, config, prefix="").items()})
    tsd = _numpy_sd(bare)
    again = clip_vision_to_torch(clip_vision_from_torch(tsd, config), config, prefix="")
    assert again.keys() == tsd.keys()
    for k in tsd:
        assert again[k].dtype == tsd[k].dtype and np.array_equal(again[k], tsd[k]), k


def test_conversion_errors_name_the_key():
    name = "gelu_new_p8_one_layer_4ch"
    config = CLIPVisionConfig(**CONFIGS[name])
    sd = _numpy_sd(_torch_model(name))
    p = "vision_model."

    with pytest.raises(ClipConvertError, match="with_projection=True") as e:
        clip_vision_from_torch(sd, config)
    assert isinstance(e.value, SdsupError)

    # Old checkpoints carry the position_ids buffer: accepted (size checked), not a parameter.
    with_buffer = dict(sd, **{p + "embeddings.position_ids": np.arange(config.num_positions)[None]})
    assert jax.tree.structure(clip_vision_from_torch(with_buffer, config, with_projection=True)) == jax.tree.structure(
        clip_vision_from_torch(sd, config, with_projection=True))
    with pytest.raises(ClipConvertError, match="position_ids has 5 entries"):
        clip_vision_from_torch(dict(sd, **{p + "embeddings.position_ids": np.arange(5)[None]}), config,
                               with_projection=True)

    missing = {k: v for k, v in sd.items() if k != p + "post_layernorm.bias"}
    with pytest.raises(ClipConvertError, match=r"missing keys \['vision_model.post_layernorm.bias'\]"):
        clip_vision_from_torch(missing, config, with_projection=True)

    extra = dict(sd, **{p + "encoder.layers.1.mlp.fc1.bias": np.zeros(40, np.float32)})
    with pytest.raises(ClipConvertError, match=r"unexpected keys \['vision_model.encoder.layers.1.mlp.fc1.bias'\]"):
        clip_vision_from_torch(extra, config, with_projection=True)

    bad = dict(sd, **{p + "embeddings.patch_embedding.weight": np.zeros((24, 3, 8, 8), np.float32)})
    with pytest.raises(ClipConvertError, match=r"'vision_model.embeddings.patch_embedding.weight' has shape "
                                               r"\(24, 3, 8, 8\), expected \(24, 4, 8, 8\)"):
        clip_vision_from_torch(bad, config, with_projection=True)

    with pytest.raises(ClipConvertError, match="not a CLIP vision state dict"):
        clip_vision_from_torch({"text_model.final_layer_norm.bias": np.zeros(3)}, config)

    # A config with a different patch size: the positions and the conv no longer fit.
    other = CLIPVisionConfig(**dict(CONFIGS[name], patch_size=4))
    with pytest.raises(ClipConvertError, match="position_embedding.weight' has shape"):
        clip_vision_from_torch(sd, other, with_projection=True)

    params = clip_vision_from_torch(sd, config, with_projection=True)["params"]
    params["vision_model"]["post_layernorm"]["extra"] = np.zeros(3, np.float32)
    with pytest.raises(ClipConvertError, match="vision_model/post_layernorm/extra"):
        clip_vision_to_torch(params, config, with_projection=True)
    del params["vision_model"]["post_layernorm"]["extra"], params["visual_projection"]
    with pytest.raises(ClipConvertError, match="visual_projection/kernel"):
        clip_vision_to_torch(params, config, with_projection=True)


def test_config_round_trips_through_transformers():
    for kwargs in CONFIGS.values():
        config = CLIPVisionConfig(**kwargs)
        hf = transformers.CLIPVisionConfig(**clip_vision_config_to_transformers(config))
        assert clip_vision_config_from_transformers(hf) == config
        assert clip_vision_config_from_transformers(hf.to_dict()) == config
    # A full CLIPConfig contributes its vision_config and its top-level projection_dim.
    full = transformers.CLIPConfig(vision_config=CONFIGS["quick_gelu_p4"], projection_dim=7)
    assert clip_vision_config_from_transformers(full) == CLIPVisionConfig(**dict(CONFIGS["quick_gelu_p4"],
                                                                                 projection_dim=7))
    assert CLIPVisionConfig(image_size=[16, 16], patch_size=(4, 4)) == CLIPVisionConfig(image_size=16, patch_size=4)
    for kwargs, match in [(dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
                          (dict(hidden_act="xielu"), "hidden_act"),
                          (dict(image_size=30, patch_size=4), "not divisible by patch_size"),
                          (dict(image_size=(16, 20)), "square")]:
        with pytest.raises(ValueError, match=match):
            CLIPVisionConfig(**kwargs)
    with pytest.raises(ValueError, match="NHWC"):
        config = CLIPVisionConfig(**CONFIGS["quick_gelu_p4"])
        CLIPVisionTransformer(config).init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)))


# openai/clip-vit-large-patch14's vision_config (with the top-level projection_dim).
VIT_L14_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def test_vit_l14_vision_parameter_count_abstractly():
    config = CLIPVisionConfig(**VIT_L14_VISION)
    abstract = jax.eval_shape(
        lambda: CLIPVisionModelWithProjection(config).init(jax.random.key(0), dummy_pixels(config)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))

    # transformers agrees, built on the meta device so nothing is allocated.
    with torch.device("meta"):
        hf_config = transformers.CLIPVisionConfig(**clip_vision_config_to_transformers(config))
        tmodel = transformers.CLIPVisionModelWithProjection(hf_config)
    assert count == sum(p.numel() for p in tmodel.parameters())
    assert 303_000_000 < count < 305_000_000  # ViT-L/14 + projection, as published (~304M)

    # Every parameter carries logical axis names (the partitioning convention).
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    specs = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            nn.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )[0]
    }
    P = jax.sharding.PartitionSpec
    emb = "params/vision_model/embeddings/"
    assert specs[emb + "patch_embedding/kernel"] == P("kernel_h", "kernel_w", "in_channels", "out_channels")
    assert specs[emb + "class_embedding"] == P("out_channels")
    assert specs[emb + "position_embedding/embedding"] == P("positions", "out_channels")
    assert specs["params/vision_model/encoder/layers_23/mlp/fc1/kernel"] == P("in_channels", "out_channels")
    assert specs["params/vision_model/pre_layrnorm/scale"] == P("norm")
    assert specs["params/visual_projection/kernel"] == P("in_channels", "out_channels")


def test_model_directory_round_trip(tmp_path):
    config = CLIPVisionConfig(**CONFIGS["gelu_odd_hidden_p5"])
    params = nn.meta.unbox(_random_boxed(config, seed=5))["params"]
    model_io.save(str(tmp_path / "image_encoder"), "image_encoder", config, params)
    kind, loaded_config, loaded, _ = model_io.load(str(tmp_path / "image_encoder"))
    assert kind == "image_encoder" and loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
