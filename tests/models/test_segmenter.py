"""UperNetSegmenter against transformers' UperNetForSemanticSegmentation (ResNet backbone).

Every case builds the PyTorch model from a transformers UperNetConfig with
random weights, including random BatchNorm affine parameters and running
statistics (fresh ones are 0/1, which would make eval mode an identity test).
"""

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict
from transformers import ResNetConfig, UperNetConfig, UperNetForSemanticSegmentation

from sdsup.convert.segmenter import (
    segmenter_config_from_transformers,
    segmenter_config_to_transformers,
    segmenter_from_torch,
    segmenter_to_torch,
)
from sdsup.models.partitioning import BIAS, CONV_KERNEL, NORM_PARAM
from sdsup.models.segmenter import (
    SegmenterConfig,
    UperNetSegmenter,
    adaptive_avg_pool,
    resize_bilinear,
)

ATOL = 1e-4


def _upernet(backbone: dict, **head) -> UperNetConfig:
    return UperNetConfig(backbone_config=ResNetConfig(**backbone), **head)


# Three tiny architectures; input sizes chosen so feature maps are not
# multiples of the pool scales (overlapping and repeated adaptive-pool bins,
# PPM maps larger than the feature they are resized back to).
CASES = {
    # Basic blocks, 4 stages; 40x40 -> features 10, 5, 3, 2.
    "basic4_40x40": (
        _upernet(
            dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic",
                 out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=16, num_labels=5, use_auxiliary_head=False,
        ),
        (40, 40),
    ),
    # Bottleneck blocks, 3 stages, stride in the 1x1, FCN auxiliary head with
    # two convs + concat; 56x72 -> features 14x18, 7x9, 4x5.
    "bottleneck3_aux_56x72": (
        _upernet(
            dict(embedding_size=8, hidden_sizes=[16, 32, 48], depths=[2, 1, 2], layer_type="bottleneck",
                 downsample_in_bottleneck=True, out_features=["stage1", "stage2", "stage3"]),
            hidden_size=12, num_labels=7, pool_scales=[1, 2, 3, 6], use_auxiliary_head=True,
            auxiliary_channels=8, auxiliary_num_convs=2, auxiliary_concat_input=True,
        ),
        (56, 72),
    ),
    # Basic blocks where stage1 keeps the stem width and stride (identity
    # shortcut), stride in the first stage, the stem among the head's inputs,
    # other pool scales; odd 50x38 -> stem 13x10, stages 7x5, 4x3, 2x2.
    "basic3_stem_50x38": (
        _upernet(
            dict(embedding_size=12, hidden_sizes=[12, 12, 20], depths=[2, 1, 1], layer_type="basic",
                 downsample_in_first_stage=True, out_features=["stem", "stage2", "stage3"]),
            hidden_size=8, num_labels=3, pool_scales=[1, 3, 4], use_auxiliary_head=False,
        ),
        (50, 38),
    ),
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of O(1)-preserving scale and non-trivial BatchNorm state.

    transformers' init gives the classifier std 0.02 (logits ~1e-2, which would
    make a 1e-4 tolerance meaningless) and BatchNorm identity statistics.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.2)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(int(torch.randint(0, 1000, ())))
    return model


def _images(size, seed, batch=2):
    x = np.random.RandomState(seed).uniform(-1.0, 1.0, (batch, *size, 3)).astype(np.float32)
    # What the PyTorch model receives: the normalisation UperNetSegmenter does inside.
    cfg = SegmenterConfig()
    pv = ((x + 1.0) / 2.0 - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x, torch.from_numpy(np.ascontiguousarray(pv.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _case(name):
    tcfg, size = CASES[name]
    cfg = segmenter_config_from_transformers(tcfg)
    seed = list(CASES).index(name)
    tmodel = _randomize(UperNetForSemanticSegmentation(tcfg), seed).eval()
    images, pixel_values = _images(size, seed)
    return dict(tcfg=tcfg, cfg=cfg, tmodel=tmodel, images=images, pixel_values=pixel_values)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return _case(request.param)


def test_eval_matches_torch(case):
    cfg, tmodel = case["cfg"], case["tmodel"]
    params, stats = segmenter_from_torch(tmodel.state_dict(), cfg)
    model = UperNetSegmenter(cfg)

    @jax.jit
    def run(variables, x):
        out = model.apply(variables, x, train=False, return_aux=cfg.use_auxiliary_head)
        pooled = model.apply(variables, x, method=UperNetSegmenter.pooled_features)
        return out, pooled

    out, pooled = run({"params": params, "batch_stats": stats}, case["images"])
    logits, aux = out if cfg.use_auxiliary_head else (out, None)

    pv = case["pixel_values"]
    with torch.no_grad():
        ref = tmodel(pv).logits
        bb = tmodel.backbone(pv, output_hidden_states=True)
        ref_pooled = bb.hidden_states[-1].mean(dim=(2, 3)).numpy()
        ref_aux = None
        if cfg.use_auxiliary_head:
            ref_aux = F.interpolate(tmodel.auxiliary_head(bb.feature_maps), size=pv.shape[2:], mode="bilinear",
                                    align_corners=False)

    assert logits.shape == (*case["images"].shape[:3], cfg.num_classes)
    assert logits.dtype == jnp.float32
    ref = _nhwc(ref)
    assert np.abs(ref).max() > 0.5  # the comparison below is not vacuous
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=ATOL)
    assert pooled.shape == (case["images"].shape[0], cfg.hidden_sizes[-1])
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled, rtol=0, atol=ATOL)
    if cfg.use_auxiliary_head:
        np.testing.assert_allclose(np.asarray(aux), _nhwc(ref_aux), rtol=0, atol=ATOL)


def test_train_matches_torch(case):
    """Batch statistics in the forward pass and the running-stat update, vs torch train mode."""
    cfg = case["cfg"]
    tmodel = copy.deepcopy(case["tmodel"]).train()
    params, stats = segmenter_from_torch(tmodel.state_dict(), cfg)
    model = UperNetSegmenter(cfg)

    @jax.jit
    def run(params, stats, x):
        return model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])

    logits, updated = run(params, stats, case["images"])
    # The Flax trees were converted before torch's forward mutates its buffers in
    # place: this also guards segmenter_from_torch against aliasing torch memory.
    with torch.no_grad():
        ref = _nhwc(tmodel(case["pixel_values"]).logits)  # also runs (and updates) the auxiliary head
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=ATOL)

    _, ref_stats = segmenter_from_torch(tmodel.state_dict(), cfg)
    got = flatten_dict(nn.meta.unbox(updated["batch_stats"]))
    want = flatten_dict(ref_stats)
    before = flatten_dict(stats)
    assert got.keys() == want.keys()
    for key in want:
        if key[-1] == "num_batches_tracked":
            assert int(got[key]) == int(want[key]) == int(before[key]) + 1, key
        else:
            # The update really happened (the test would otherwise compare old stats).
            assert not np.array_equal(np.asarray(got[key]), np.asarray(before[key])), key
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-6,
                                       err_msg="/".join(key))


def test_remat_changes_nothing_but_the_backward_schedule():
    """remat=True: same parameter names, logits, BatchNorm updates and gradients (train mode). On the case with
    every part (bottleneck blocks, the auxiliary head, a non-square input): each case costs a train-mode compile."""
    case = _case("bottleneck3_aux_56x72")
    cfg = case["cfg"]
    params, stats = segmenter_from_torch(case["tmodel"].state_dict(), cfg)
    x = jnp.asarray(case["images"])
    out = {}
    for remat in (False, True):
        model = UperNetSegmenter(cfg, remat=remat)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
        assert jax.tree.structure(nn.meta.unbox(shapes["params"])) == jax.tree.structure(params)

        def loss(p, x):
            logits, updated = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                          mutable=["batch_stats"])
            return jnp.mean(jnp.square(logits)), updated["batch_stats"]

        (value, new_stats), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        out[remat] = (value, new_stats, grads)
    for a, b in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True])):
        # Recomputation may fuse differently: float32 rounding, not exact equality.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(out[True][2][1]))) > 0  # gradients reach the input


def _random_like(tree, rng: np.random.RandomState):
    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(rng.randint(0, 10_000, x.shape), x.dtype)
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(fill, tree)


def test_init_tree_axes_and_bitwise_round_trip(case):
    cfg, tcfg = case["cfg"], case["tcfg"]
    model = UperNetSegmenter(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), case["images"], train=False))

    # Every parameter and statistic carries logical axis names of the right kind.
    for col in ("params", "batch_stats"):
        for path, leaf in flatten_dict(boxed[col]).items():
            assert isinstance(leaf, nn.Partitioned), path
            assert len(leaf.names) == leaf.value.ndim, path
            expected = {"kernel": CONV_KERNEL, "bias": BIAS if "classifier" in path else NORM_PARAM,
                        "scale": NORM_PARAM, "mean": NORM_PARAM, "var": NORM_PARAM, "num_batches_tracked": ()}
            assert tuple(leaf.names) == expected[path[-1]], path

    # The converter's trees are exactly the model's trees.
    params, stats = segmenter_from_torch(case["tmodel"].state_dict(), cfg)
    shapes = lambda t: {k: (v.shape, v.dtype) for k, v in flatten_dict(t).items()}  # noqa: E731
    abstract = nn.meta.unbox(boxed)
    assert shapes(params) == shapes(abstract["params"])
    assert shapes(stats) == shapes(abstract["batch_stats"])

    # Flax -> PyTorch (loaded strictly into the real module) -> Flax, bitwise.
    rng = np.random.RandomState(7)
    params = _random_like(abstract["params"], rng)
    stats = _random_like(abstract["batch_stats"], rng)
    sd = segmenter_to_torch(params, stats, cfg)
    tmodel = UperNetForSemanticSegmentation(tcfg)
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    tsd = tmodel.state_dict()
    assert list(sd) == list(tsd)  # same keys, same order as transformers
    assert all(tsd[k].dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32) for k in tsd)
    params2, stats2 = segmenter_from_torch(tsd, cfg)
    for a, b in ((params, params2), (stats, stats2)):
        fa, fb = flatten_dict(a), flatten_dict(b)
        assert fa.keys() == fb.keys()
        for k in fa:
            assert fa[k].dtype == fb[k].dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k

    # And PyTorch -> Flax -> PyTorch, bitwise.
    src = case["tmodel"].state_dict()
    back = segmenter_to_torch(*segmenter_from_torch(src, cfg), cfg)
    assert back.keys() == src.keys()
    for k, v in src.items():
        assert np.array_equal(back[k], v.numpy()) and back[k].dtype == v.numpy().dtype, k


def test_config_round_trip(case):
    cfg, tcfg = case["cfg"], case["tcfg"]
    assert segmenter_config_from_transformers(segmenter_config_to_transformers(cfg)) == cfg
    assert segmenter_config_from_transformers(tcfg.to_dict()) == cfg
    # config.json form: string label ids, lists.
    assert segmenter_config_from_transformers(json.loads(json.dumps(tcfg.to_dict()))) == cfg
    assert cfg.num_classes == tcfg.num_labels
    assert cfg.use_auxiliary_head == tcfg.use_auxiliary_head
    assert list(cfg.feature_stages) == list(tcfg.backbone_config.out_features)


def test_conversion_errors_name_the_key(case):
    cfg = case["cfg"]
    sd = dict(case["tmodel"].state_dict())

    key = "decode_head.fpn_bottleneck.batch_norm.running_var"
    broken = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        segmenter_from_torch(broken, cfg)

    with pytest.raises(KeyError, match=r"decode_head\.extra\.weight"):
        segmenter_from_torch({**sd, "decode_head.extra.weight": torch.zeros(1)}, cfg)

    key = "backbone.embedder.embedder.convolution.weight"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        segmenter_from_torch({**sd, key: sd[key][:, :2]}, cfg)

    params, stats = segmenter_from_torch(sd, cfg)
    del params["decode_head"]["classifier"]["bias"]
    with pytest.raises(KeyError, match="decode_head/classifier/bias"):
        segmenter_to_torch(params, stats, cfg)
    params, stats = segmenter_from_torch(sd, cfg)
    stats["decode_head"]["extra"] = {"mean": jnp.zeros(3)}
    with pytest.raises(KeyError, match="batch_stats/decode_head/extra/mean"):
        segmenter_to_torch(params, stats, cfg)


def test_discriminator_has_fake_class_and_exports_to_torch():
    """N semantic classes + 1 fake: a Flax-initialised model exported to PyTorch agrees with it."""
    n = 4
    cfg = SegmenterConfig(num_classes=n, embedding_size=8, hidden_sizes=(8, 16, 16, 24), depths=(1, 1, 1, 1),
                          layer_type="basic", head_channels=8).with_fake_class()
    assert cfg.num_classes == n + 1
    images, pixel_values = _images((40, 40), seed=11)
    model = UperNetSegmenter(cfg)
    # Random values in the init's structure (compiling the real init costs ~25 s
    # of CPU here; the init tree itself is checked in the round-trip test).
    # Kernels scaled by fan-in and positive running variances keep logits O(1).
    abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(3), images, train=False)))
    rng = np.random.RandomState(5)

    def fill(path, x):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.standard_normal(x.shape) * (2.0 / np.prod(x.shape[:3])) ** 0.5, x.dtype)
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if name == "num_batches_tracked":
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype)

    params = jax.tree_util.tree_map_with_path(fill, abstract["params"])
    stats = jax.tree_util.tree_map_with_path(fill, abstract["batch_stats"])
    logits = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=False))(params, stats, images)
    assert logits.shape == (2, 40, 40, n + 1)

    tmodel = UperNetForSemanticSegmentation(segmenter_config_to_transformers(cfg)).eval()
    assert tmodel.config.num_labels == n + 1
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in segmenter_to_torch(params, stats, cfg).items()})
    with torch.no_grad():
        ref = _nhwc(tmodel(pixel_values).logits)
    assert ref.shape[-1] == n + 1
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("src,dst", [((2, 3), (6, 6)), ((6, 6), (2, 3)), ((5, 7), (13, 4)), ((4, 5), (4, 9)), ((1, 1), (3, 2))])
def test_resize_bilinear_matches_torch(src, dst):
    x = np.random.RandomState(0).standard_normal((2, *src, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=dst, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(x), dst)), _nhwc(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("src,out", [((4, 5), 6), ((7, 9), 3), ((2, 3), 6), ((13, 10), 4), ((6, 6), 2), ((3, 3), 1)])
def test_adaptive_avg_pool_matches_torch(src, out):
    x = np.random.RandomState(1).standard_normal((2, *src, 3)).astype(np.float32)
    ref = F.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), out)
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), out)), _nhwc(ref), rtol=0, atol=1e-6)


def test_train_mode_rejects_single_value_per_channel():
    """As torch: the pool-scale-1 branch of a batch of 1 has one value per channel."""
    cfg = segmenter_config_from_transformers(CASES["basic4_40x40"][0])
    model = UperNetSegmenter(cfg)
    x = jnp.zeros((1, 40, 40, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="layer_type"):
        SegmenterConfig(layer_type="preact")
    with pytest.raises(ValueError, match="out_features"):
        SegmenterConfig(out_features=("stage2", "stage1"))
    with pytest.raises(ValueError, match="auxiliary head reads"):
        SegmenterConfig(depths=(1, 1), hidden_sizes=(8, 16), use_auxiliary_head=True)
    with pytest.raises(ValueError, match="only ResNet and ConvNeXt"):
        segmenter_config_from_transformers({"model_type": "upernet", "backbone_config": {"model_type": "swin"}})


def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
    cfg = segmenter_config_from_transformers(CASES["bottleneck3_aux_56x72"][0])
    model = UperNetSegmenter(cfg, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 56, 72, 3), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False)))
    for path, leaf in flatten_dict(variables).items():
        assert leaf.dtype == (jnp.int32 if path[-1] == "num_batches_tracked" else jnp.float32), path
    (logits, aux), updated = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"], return_aux=True), variables)
    assert logits.dtype == aux.dtype == jnp.float32
    assert logits.shape == aux.shape == (2, 56, 72, cfg.num_classes)
    assert jax.tree.map(lambda a: a.dtype, updated["batch_stats"]) == jax.tree.map(
        lambda a: a.dtype, variables["batch_stats"])
