"""The text -> layout network: shapes, the MASK id, config checks, model files, evaluation helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsup.evaluation import layout as layout_eval
from sdsup.models import io as model_io
from sdsup.models.layout import LayoutConfig, LayoutModel, dummy_inputs

UNET = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, norm_num_groups=4,
            layers_per_block=1)


def _config():
    return LayoutConfig.build(num_classes=5, resolution=8, embed_dim=6, cross_attention_dim=12, **UNET)


def test_logits_over_classes_and_every_id_including_mask_is_embedded():
    config = _config()
    model = LayoutModel(config)
    params = model.init(jax.random.PRNGKey(0), *dummy_inputs(config, context_length=3))["params"]
    assert params["class_embedding"].value.shape == (6, 6)  # 5 classes + MASK
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 6, (2, 8, 8)), jnp.int32)
    context = jnp.ones((2, 3, 12))
    apply = jax.jit(model.apply)  # one compile for the three calls (op by op, a UNet is slow)
    logits = apply({"params": params}, ids, jnp.array([0.2, 1.0]), context)
    assert logits.shape == (2, 8, 8, 5) and logits.dtype == jnp.float32
    # The mask ratio and the text both reach the output.
    other_ratio = apply({"params": params}, ids, jnp.array([0.9, 0.1]), context)
    other_text = apply({"params": params}, ids, jnp.array([0.2, 1.0]), -context)
    assert float(jnp.max(jnp.abs(other_ratio - logits))) > 0 and float(jnp.max(jnp.abs(other_text - logits))) > 0
    with pytest.raises(ValueError, match=r"expected ids \[B, 8, 8\]"):
        model.apply({"params": params}, ids[:, :4], jnp.ones((2,)), context)


def test_position_embedding_tells_pixels_of_a_fully_masked_map_apart(tmp_path):
    config = LayoutConfig.build(num_classes=5, resolution=8, embed_dim=6, cross_attention_dim=12,
                                position_embedding=True, **UNET)
    model = LayoutModel(config)
    ids, ratio, context = dummy_inputs(config, context_length=3)
    params = model.init(jax.random.PRNGKey(0), ids, ratio, context)["params"]
    assert params["position_embedding"].value.shape == (64, 6)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, ids, ratio, context)
    # The UNet's input itself differs between pixels: transposing the table transposes what the
    # first convolution sees, so the output changes.
    table = params["position_embedding"].value.reshape(8, 8, 6).transpose(1, 0, 2).reshape(64, 6)
    swapped = dict(params, position_embedding=params["position_embedding"].replace_boxed(table))
    assert float(jnp.max(jnp.abs(apply({"params": swapped}, ids, ratio, context) - logits))) > 1e-3
    model_io.save(str(tmp_path / "m"), "layout", config, nn.meta.unbox(params))
    assert model_io.load(str(tmp_path / "m"))[1] == config
    # Model files written before the option existed still load (the option defaults to off).
    assert not _config().position_embedding


def test_config_checks_and_model_files_round_trip(tmp_path):
    with pytest.raises(ValueError, match="resolution 6 must divide"):
        LayoutConfig.build(num_classes=5, resolution=6, embed_dim=6, cross_attention_dim=12,
                           **dict(UNET, block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D",) * 3,
                                  up_block_types=("UpBlock2D",) * 3))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        LayoutConfig.build(num_classes=1, resolution=8, embed_dim=6, cross_attention_dim=12, **UNET)
    config = _config()
    params = jax.tree.map(np.asarray, LayoutModel(config).init(jax.random.PRNGKey(0), *dummy_inputs(config, 3))["params"])
    params = nn.meta.unbox(params)
    model_io.save(str(tmp_path / "m"), "layout", config, params)
    kind, loaded, got, _ = model_io.load(str(tmp_path / "m"))
    assert kind == "layout" and loaded == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_baselines_and_relations():
    labels = np.zeros((3, 4, 4), np.int32)
    labels[:2, 0] = 1
    labels[2, 0] = 255
    np.testing.assert_array_equal(layout_eval.majority_map(labels, 3, 255)[0], [1, 1, 1, 1])
    index = layout_eval.CaptionIndex(["sky over sand. a car on the left.", "sky over snow. a tree on the right."])
    assert list(index.nearest(["a tree on the right over snow", "car left, sand"])) == [1, 0]
    m = np.zeros((4, 4), np.int32)
    m[:, 0], m[:, 3], m[0, 1:3] = 1, 2, 3
    assert layout_eval.relation_holds(m, 1, "left of", 2) and layout_eval.relation_holds(m, 2, "right of", 1)
    assert layout_eval.relation_holds(m, 3, "above", 0) and not layout_eval.relation_holds(m, 0, "above", 3)
    assert not layout_eval.relation_holds(m, 4, "left of", 1)  # a missing class fails its relations
