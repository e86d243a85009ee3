"""sdsup CLIP text encoder vs transformers' CLIPTextModel, and weight conversion both ways."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from sdsup.convert.clip_text import (
    clip_text_config_from_transformers,
    clip_text_config_to_transformers,
    clip_text_from_torch,
    clip_text_to_torch,
)
from sdsup.models.clip_text import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTextTransformer

torch.set_num_threads(1)  # the CPU cores are shared with other test runs

# Distinct tiny configs: activation, head count / head_dim, depth, legacy vs real
# EOS id, and an odd hidden size (45 = 5 heads x 9).
CONFIGS = {
    "quick_gelu_legacy_eos": dict(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1,
        projection_dim=12,
    ),
    "gelu_odd_hidden_eos7": dict(
        vocab_size=61, hidden_size=45, intermediate_size=50, num_hidden_layers=3, num_attention_heads=5,
        max_position_embeddings=12, hidden_act="gelu", eos_token_id=7, bos_token_id=6, pad_token_id=1,
        layer_norm_eps=1e-6, projection_dim=20,
    ),
    "gelu_new_one_layer_eos40": dict(
        vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=6,
        max_position_embeddings=10, hidden_act="gelu_new", eos_token_id=40, bos_token_id=41, pad_token_id=40,
        projection_dim=8,
    ),
}
SEQ = {"quick_gelu_legacy_eos": 13, "gelu_odd_hidden_eos7": 12, "gelu_new_one_layer_eos40": 9}
TOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random and O(1)-scaled: CLIP's init leaves biases at 0 and
    layer norms at 1, which would hide a swapped or dropped bias/scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            elif name.endswith("weight"):
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.2 * noise)


def _torch_model(name: str, cls=transformers.CLIPTextModel):
    torch.manual_seed(0)
    model = cls(transformers.CLIPTextConfig(**CONFIGS[name])).eval()
    _randomize(model, seed=len(name))
    return model


def _numpy_sd(model: torch.nn.Module):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs(name: str):
    """Token ids, a right-padding mask (EOS then padding, as the tokenizer
    emits), and a left-padding mask (rows whose queries see no key)."""
    cfg = CONFIGS[name]
    batch, seq = 3, SEQ[name]
    rng = np.random.default_rng(123)
    reserved = {cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]}
    pool = np.array([t for t in range(cfg["vocab_size"]) if t not in reserved])
    ids = rng.choice(pool, size=(batch, seq)).astype(np.int64)
    ids[:, 0] = cfg["bos_token_id"]
    mask = np.ones((batch, seq), np.int64)
    for row, length in enumerate([seq, seq - 3, 4]):  # tokens incl. EOS
        ids[row, length - 1] = cfg["eos_token_id"]
        ids[row, length:] = cfg["pad_token_id"]
        mask[row, length:] = 0
    left = np.ones((batch, seq), np.int64)
    left[1, :2] = 0
    left[2, :5] = 0
    return ids, mask, left


def _flax_forward(model, variables, ids, mask=None, hidden=False):
    fn = jax.jit(lambda v, i, m: model.apply(v, i, m, output_hidden_states=hidden))
    return fn(variables, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


def _torch_forward(model, ids, mask=None):
    with torch.no_grad():
        return model(
            torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )


def _assert_close(flax_array, torch_tensor, what):
    diff = np.max(np.abs(np.asarray(flax_array) - torch_tensor.numpy()))
    assert diff <= TOL, f"{what}: max abs diff {diff}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_transformers(name):
    tmodel = _torch_model(name)
    config = clip_text_config_from_transformers(tmodel.config)
    variables = clip_text_from_torch(_numpy_sd(tmodel), config)
    fmodel = CLIPTextTransformer(config)
    ids, mask, left = _inputs(name)

    for label, m in (("no mask", None), ("right padding", mask), ("left padding", left)):
        ref = _torch_forward(tmodel, ids, m)
        out = _flax_forward(fmodel, variables, ids, m, hidden=True)
        # transformers' default attention is SDPA, which zeroes queries that see
        # no key; we follow it, so even padded positions agree.
        assert tmodel.config._attn_implementation == "sdpa"
        _assert_close(out.last_hidden_state, ref.last_hidden_state, f"{label}: last_hidden_state")
        _assert_close(out.pooled_output, ref.pooler_output, f"{label}: pooled_output")
        assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            _assert_close(a, b, f"{label}: hidden_states[{i}]")

    # The pooling rule itself, independent of the numerics: legacy id 2 pools at
    # argmax(ids); otherwise at the first EOS even when pad == EOS follows it.
    out = _flax_forward(fmodel, variables, ids, mask)
    if config.eos_token_id == 2:
        pos = ids.argmax(-1)
    else:
        pos = np.array([list(r).index(config.eos_token_id) for r in ids])
        assert list(pos) == [SEQ[name] - 1, SEQ[name] - 4, 3]
    np.testing.assert_array_equal(
        np.asarray(out.pooled_output), np.asarray(out.last_hidden_state)[np.arange(len(ids)), pos]
    )


def test_remat_is_numerically_transparent():
    name = "gelu_odd_hidden_eos7"
    tmodel = _torch_model(name)
    config = clip_text_config_from_transformers(tmodel.config)
    variables = clip_text_from_torch(_numpy_sd(tmodel), config)
    ids, mask, _ = _inputs(name)
    plain = _flax_forward(CLIPTextTransformer(config), variables, ids, mask)
    remat = _flax_forward(CLIPTextTransformer(config, remat=True), variables, ids, mask)
    np.testing.assert_allclose(np.asarray(remat.last_hidden_state), np.asarray(plain.last_hidden_state), atol=1e-6)
    # ... and it really is rematerialised (one checkpointed call per layer).
    jaxpr = jax.make_jaxpr(lambda v: CLIPTextTransformer(config, remat=True).apply(v, ids, mask))(variables)
    assert sum(e.primitive.name == "remat2" for e in jaxpr.eqns) == config.num_hidden_layers


def test_bfloat16_compute_tracks_float32():
    name = "gelu_odd_hidden_eos7"
    tmodel = _torch_model(name)
    config = clip_text_config_from_transformers(tmodel.config)
    variables = clip_text_from_torch(_numpy_sd(tmodel), config)
    ids, mask, _ = _inputs(name)
    ref = _torch_forward(tmodel, ids, mask).last_hidden_state.numpy()
    out = _flax_forward(CLIPTextTransformer(config, dtype=jnp.bfloat16), variables, ids, mask)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out.last_hidden_state, np.float32) - ref)
    # bf16 keeps ~3 significant digits; the outputs are layer-normed (O(1)).
    assert err.mean() < 2e-2 and err.max() < 0.2, (err.mean(), err.max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trips_are_bitwise(name):
    config = CLIPTextConfig(**CONFIGS[name])
    boxed = CLIPTextTransformer(config).init(jax.random.key(1), jnp.ones((1, 4), jnp.int32))
    flax_params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))

    # Flax -> PyTorch -> Flax.
    sd = clip_text_to_torch(boxed, config)
    assert all(k.startswith("text_model.") for k in sd)
    back = clip_text_from_torch(sd, config)
    assert jax.tree.structure(back) == jax.tree.structure(flax_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(flax_params)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)

    # The unprefixed export is exactly transformers 5's state_dict: strict load,
    # then PyTorch -> Flax -> PyTorch is bitwise too.
    tmodel = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_text_config_to_transformers(config)))
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in clip_text_to_torch(back, config, prefix="").items()})
    tsd = _numpy_sd(tmodel)
    again = clip_text_to_torch(clip_text_from_torch(tsd, config), config, prefix="")
    assert again.keys() == tsd.keys()
    for k in tsd:
        assert again[k].dtype == tsd[k].dtype and np.array_equal(again[k], tsd[k]), k


def test_export_loads_with_from_pretrained(tmp_path):
    name = "gelu_odd_hidden_eos7"
    config = CLIPTextConfig(**CONFIGS[name])
    variables = clip_text_from_torch(_numpy_sd(_torch_model(name)), config)
    # Re-randomise through Flax so the written weights did not come from torch.
    variables = jax.tree.map(lambda x: x * 1.1 + 0.01, variables)

    # What save_pretrained writes: config.json + model.safetensors.
    transformers.CLIPTextConfig(**clip_text_config_to_transformers(config)).save_pretrained(tmp_path)
    safetensors.numpy.save_file(clip_text_to_torch(variables, config), os.path.join(tmp_path, "model.safetensors"),
                                metadata={"format": "pt"})
    loaded, info = transformers.CLIPTextModel.from_pretrained(tmp_path, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert clip_text_config_from_transformers(loaded.config) == config

    ids, mask, _ = _inputs(name)
    for m in (None, mask):
        ref = _torch_forward(loaded.eval(), ids, m)
        out = _flax_forward(CLIPTextTransformer(config), variables, ids, m)
        _assert_close(out.last_hidden_state, ref.last_hidden_state, "reloaded last_hidden_state")
        _assert_close(out.pooled_output, ref.pooler_output, "reloaded pooled_output")


def test_with_projection_matches_and_round_trips():
    name = "quick_gelu_legacy_eos"
    tmodel = _torch_model(name, transformers.CLIPTextModelWithProjection)
    config = clip_text_config_from_transformers(tmodel.config)
    sd = _numpy_sd(tmodel)
    assert "text_projection.weight" in sd and "text_model.final_layer_norm.bias" in sd

    with pytest.raises(KeyError, match="with_projection=True"):
        clip_text_from_torch(sd, config)
    variables = clip_text_from_torch(sd, config, with_projection=True)
    ids, mask, _ = _inputs(name)
    out = _flax_forward(CLIPTextModelWithProjection(config), variables, ids, mask)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    _assert_close(out.text_embeds, ref.text_embeds, "text_embeds")
    _assert_close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")

    back = clip_text_to_torch(variables, config, with_projection=True)
    assert back.keys() == sd.keys()
    assert all(np.array_equal(back[k], sd[k]) for k in sd)

    # init'd projection model exports as well (and has the same tree as import).
    boxed = CLIPTextModelWithProjection(config).init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))
    assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(variables)


def test_conversion_errors_name_the_key():
    name = "gelu_new_one_layer_eos40"
    config = CLIPTextConfig(**CONFIGS[name])
    sd = clip_text_to_torch(clip_text_from_torch(_numpy_sd(_torch_model(name)), config), config)

    # Old checkpoints carry the position_ids buffer: accepted, not a parameter.
    with_buffer = dict(sd, **{"text_model.embeddings.position_ids": np.arange(10)[None]})
    assert jax.tree.structure(clip_text_from_torch(with_buffer, config)) == jax.tree.structure(
        clip_text_from_torch(sd, config))
    with pytest.raises(ValueError, match="position_ids"):
        clip_text_from_torch(dict(sd, **{"text_model.embeddings.position_ids": np.arange(9)[None]}), config)

    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.0.mlp.fc2.bias"}
    with pytest.raises(KeyError, match=r"missing keys \['text_model.encoder.layers.0.mlp.fc2.bias'\]"):
        clip_text_from_torch(missing, config)

    extra = dict(sd, **{"text_model.encoder.layers.1.mlp.fc1.bias": np.zeros(40, np.float32)})
    with pytest.raises(KeyError, match=r"unexpected keys \['text_model.encoder.layers.1.mlp.fc1.bias'\]"):
        clip_text_from_torch(extra, config)

    bad = dict(sd, **{"text_model.encoder.layers.0.self_attn.k_proj.weight": np.zeros((24, 23), np.float32)})
    with pytest.raises(ValueError, match=r"text_model.encoder.layers.0.self_attn.k_proj.weight: shape \(24, 23\)"):
        clip_text_from_torch(bad, config)

    # A config with more layers than the weights: missing keys, not a crash.
    deeper = CLIPTextConfig(**dict(CONFIGS[name], num_hidden_layers=2))
    with pytest.raises(KeyError, match="text_model.encoder.layers.1.self_attn.q_proj.weight"):
        clip_text_from_torch(sd, deeper)

    params = clip_text_from_torch(sd, config)["params"]
    params["encoder"]["layers_0"]["mlp"]["fc3"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(KeyError, match="encoder/layers_0/mlp/fc3/kernel"):
        clip_text_to_torch(params, config)
    del params["encoder"]["layers_0"]["mlp"]["fc3"], params["final_layer_norm"]["bias"]
    with pytest.raises(KeyError, match="final_layer_norm/bias"):
        clip_text_to_torch(params, config)


def test_config_round_trips_through_transformers():
    for kwargs in CONFIGS.values():
        config = CLIPTextConfig(**kwargs)
        hf = transformers.CLIPTextConfig(**clip_text_config_to_transformers(config))
        assert clip_text_config_from_transformers(hf) == config
        assert clip_text_config_from_transformers(hf.to_dict()) == config
    # A full CLIPConfig contributes its text_config (and top-level projection_dim).
    full = transformers.CLIPConfig(text_config=CONFIGS["gelu_odd_hidden_eos7"], projection_dim=20)
    assert clip_text_config_from_transformers(full) == CLIPTextConfig(**CONFIGS["gelu_odd_hidden_eos7"])
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="xielu")


VIT_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1,
    projection_dim=768,
)


def test_vit_l14_text_parameter_count_abstractly():
    config = CLIPTextConfig(**VIT_L14_TEXT)
    abstract = jax.eval_shape(
        lambda: CLIPTextTransformer(config).init(jax.random.key(0), jnp.ones((1, 77), jnp.int32))
    )
    shapes = nn.meta.unbox(abstract)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == 123_060_480

    # transformers agrees, built on the meta device so nothing is allocated.
    with torch.device("meta"):
        tmodel = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_text_config_to_transformers(config)))
    assert sum(p.numel() for p in tmodel.parameters()) == count

    # Every parameter carries logical axis names (the partitioning convention).
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    specs = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            nn.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )[0]
    }
    assert specs["params/embeddings/token_embedding/embedding"] == jax.sharding.PartitionSpec("vocab", "out_channels")
    assert specs["params/encoder/layers_11/self_attn/q_proj/kernel"] == jax.sharding.PartitionSpec(
        "in_channels", "out_channels")
    assert specs["params/final_layer_norm/scale"] == jax.sharding.PartitionSpec("norm")
