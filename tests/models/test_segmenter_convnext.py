"""UperNetSegmenter(backbone="convnext") against transformers' UperNetForSemanticSegmentation + ConvNextBackbone.

The openmmlab/upernet-convnext-* ADE20K checkpoints are this architecture. A
tiny random model is saved with `save_pretrained` (config.json +
model.safetensors), read back with `load_transformers_upernet` and compared
in eval mode. Weights are randomised at O(1) scale, including BatchNorm
running statistics, LayerNorm affine parameters and the layer-scale gammas
(transformers' init would leave gammas at 1e-6, making every block nearly an
identity, and LayerNorms / BatchNorms at identity).
"""

import copy
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict
from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

from sdsup.convert import segmenter as conv
from sdsup.convert.__main__ import main as convert_main
from sdsup.errors import SdsupError
from sdsup.models.partitioning import BIAS, CONV_KERNEL, DENSE_KERNEL, NORM_PARAM
from sdsup.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, SegmenterConfig, UperNetSegmenter
from sdsup.workdir import load_model_dir

# float32 end to end: observed differences are <= 4e-6 on logits of std ~1 and magnitude up to ~4
# (approximate, tanh GELU instead of erf would be off by ~1e-3).
ATOL = 3e-5
SIZES = ((64, 64), (64, 96))
BACKBONE = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1],
                out_features=["stage1", "stage2", "stage3", "stage4"])
# SegformerImageProcessor's defaults, as its save_pretrained writes them (UperNet checkpoints use it).
PREPROCESSOR = {"image_processor_type": "SegformerImageProcessor", "do_resize": True,
                "size": {"height": 512, "width": 512}, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                "do_reduce_labels": False}


def _tconfig(aux: bool, **backbone) -> UperNetConfig:
    return UperNetConfig(backbone_config=ConvNextConfig(**{**BACKBONE, **backbone}), hidden_size=16, num_labels=5,
                         use_auxiliary_head=aux, auxiliary_channels=8)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.2)
            elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(int(torch.randint(0, 1000, ())))
        gammas = [p for n, p in model.named_parameters() if n.endswith("layer_scale_parameter")]
        assert gammas
        for p in gammas:
            p.copy_(torch.empty_like(p).uniform_(0.3, 1.0) * torch.sign(torch.randn_like(p)))
    return model


def _images(size, seed, batch=2):
    x = np.random.RandomState(seed).uniform(-1.0, 1.0, (batch, *size, 3)).astype(np.float32)
    pv = ((x + 1.0) / 2.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return x, torch.from_numpy(np.ascontiguousarray(pv.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=[False, True], ids=["no_aux", "aux"])
def case(request, tmp_path_factory):
    aux = request.param
    tcfg = _tconfig(aux)
    tmodel = _randomize(UperNetForSemanticSegmentation(tcfg), seed=int(aux)).eval()
    directory = str(tmp_path_factory.mktemp("upernet_convnext"))
    tmodel.save_pretrained(directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f)
    assert os.path.isfile(os.path.join(directory, "model.safetensors"))
    return dict(aux=aux, tcfg=tcfg, tmodel=tmodel, directory=directory)


def test_logits_match_transformers(case):
    cfg, variables = conv.load_transformers_upernet(case["directory"])
    assert cfg.backbone == "convnext" and cfg.style == "transformers"
    assert cfg.hidden_sizes == (8, 16, 32, 64) and cfg.depths == (1, 1, 2, 1)
    assert cfg.feature_stages == ("stage1", "stage2", "stage3", "stage4")
    assert (cfg.num_classes, cfg.head_channels, cfg.use_auxiliary_head) == (5, 16, case["aux"])
    assert cfg.image_mean == IMAGENET_MEAN and cfg.image_std == IMAGENET_STD
    model = UperNetSegmenter(cfg)

    @jax.jit
    def run(variables, x):
        out = model.apply(variables, x, train=False, return_aux=cfg.use_auxiliary_head)
        pooled = model.apply(variables, x, all_stages=True, method=UperNetSegmenter.pooled_features)
        return out, pooled

    tmodel = case["tmodel"]
    for k, size in enumerate(SIZES):
        images, pv = _images(size, seed=10 + k)
        out, pooled = run(variables, images)
        logits, aux = out if cfg.use_auxiliary_head else (out, None)
        with torch.no_grad():
            ref = _nhwc(tmodel(pv).logits)
            bb = tmodel.backbone(pv, output_hidden_states=True)
            ref_pooled = torch.cat([h.mean(dim=(2, 3)) for h in bb.hidden_states[1:]], -1).numpy()
        assert logits.shape == (2, *size, 5) and logits.dtype == jnp.float32
        assert np.abs(ref).max() > 0.5  # the comparison is not vacuous
        np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=ATOL, err_msg=str(size))
        assert pooled.shape == (2, sum(cfg.hidden_sizes))
        np.testing.assert_allclose(np.asarray(pooled), ref_pooled, rtol=0, atol=ATOL, err_msg=str(size))
        if cfg.use_auxiliary_head:
            with torch.no_grad():
                ref_aux = F.interpolate(tmodel.auxiliary_head(bb.feature_maps), size=size, mode="bilinear",
                                        align_corners=False)
            np.testing.assert_allclose(np.asarray(aux), _nhwc(ref_aux), rtol=0, atol=ATOL, err_msg=str(size))


def test_train_mode_matches_transformers(case):
    """Head BatchNorms on batch statistics (drop path rate 0: the backbone is as in eval), running stats updated."""
    cfg, variables = conv.load_transformers_upernet(case["directory"])
    tmodel = copy.deepcopy(case["tmodel"]).train()
    images, pv = _images((64, 96), seed=3)
    logits, updated = jax.jit(lambda v, x: UperNetSegmenter(cfg).apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images)
    with torch.no_grad():
        ref = _nhwc(tmodel(pv).logits)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=ATOL)
    _, ref_stats = conv.segmenter_from_torch(tmodel.state_dict(), cfg)
    got, want = flatten_dict(updated["batch_stats"]), flatten_dict(ref_stats)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-6,
                                   err_msg="/".join(key))


def _random_like(tree, rng: np.random.RandomState):
    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(rng.randint(0, 10_000, x.shape), x.dtype)
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(fill, tree)


def test_init_tree_axes_and_bitwise_round_trip(case):
    cfg = conv.segmenter_config_from_transformers(case["tcfg"])
    x = jnp.zeros((1, 64, 96, 3))
    boxed = jax.eval_shape(lambda: UperNetSegmenter(cfg).init(jax.random.PRNGKey(0), x, train=False))
    for col in ("params", "batch_stats"):
        for path, leaf in flatten_dict(boxed[col]).items():
            assert isinstance(leaf, nn.Partitioned), path
            assert len(leaf.names) == leaf.value.ndim, path
            if path[-1] == "kernel":
                assert tuple(leaf.names) == (DENSE_KERNEL if leaf.value.ndim == 2 else CONV_KERNEL), path
            elif path[-1] == "bias":
                assert tuple(leaf.names) in (BIAS, NORM_PARAM), path
            elif path[-1] in ("scale", "layer_scale", "mean", "var"):
                assert tuple(leaf.names) == NORM_PARAM, path
    abstract = nn.meta.unbox(boxed)
    remat = nn.meta.unbox(jax.eval_shape(
        lambda: UperNetSegmenter(cfg, remat=True).init(jax.random.PRNGKey(0), x, train=False)))
    assert jax.tree.structure(remat) == jax.tree.structure(abstract)

    # The converter's trees are exactly the model's trees.
    params, stats = conv.segmenter_from_torch(case["tmodel"].state_dict(), cfg)
    shapes = lambda t: {k: (v.shape, v.dtype) for k, v in flatten_dict(t).items()}  # noqa: E731
    assert shapes(params) == shapes(abstract["params"])
    assert shapes(stats) == shapes(abstract["batch_stats"])

    # Flax -> PyTorch (loaded strictly into the real module) -> Flax, bitwise.
    rng = np.random.RandomState(7)
    params = _random_like(abstract["params"], rng)
    stats = _random_like(abstract["batch_stats"], rng)
    sd = conv.segmenter_to_torch(params, stats, cfg)
    tmodel = UperNetForSemanticSegmentation(conv.segmenter_config_to_transformers(cfg))
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    tsd = tmodel.state_dict()
    assert list(sd) == list(tsd)  # same keys, same order as transformers
    params2, stats2 = conv.segmenter_from_torch(tsd, cfg)
    for a, b in ((params, params2), (stats, stats2)):
        fa, fb = flatten_dict(a), flatten_dict(b)
        assert fa.keys() == fb.keys()
        for k in fa:
            assert fa[k].dtype == fb[k].dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k

    # And PyTorch -> Flax -> PyTorch, bitwise.
    src = case["tmodel"].state_dict()
    back = conv.segmenter_to_torch(*conv.segmenter_from_torch(src, cfg), cfg)
    assert list(back) == list(src)
    for k, v in src.items():
        assert np.array_equal(back[k], v.numpy()) and back[k].dtype == v.numpy().dtype, k


def test_config_round_trip(case):
    tcfg = case["tcfg"]
    cfg = conv.segmenter_config_from_transformers(tcfg)
    assert conv.segmenter_config_from_transformers(conv.segmenter_config_to_transformers(cfg)) == cfg
    with open(os.path.join(case["directory"], "config.json")) as f:
        assert conv.segmenter_config_from_transformers(json.load(f)) == cfg
    assert conv.segmenter_config_from_transformers(json.loads(json.dumps(tcfg.to_dict()))) == cfg
    assert (cfg.patch_size, cfg.layer_scale_init_value) == (4, 1e-6)


def test_conversion_errors_name_the_key(case, tmp_path):
    cfg = conv.segmenter_config_from_transformers(case["tcfg"])
    sd = dict(case["tmodel"].state_dict())

    key = "backbone.hidden_states_norms.stage3.weight"
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        conv.segmenter_from_torch({k: v for k, v in sd.items() if k != key}, cfg)
    key = "backbone.encoder.stages.2.layers.1.layer_scale_parameter"
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        conv.segmenter_from_torch({k: v for k, v in sd.items() if k != key}, cfg)
    with pytest.raises(KeyError, match=r"backbone\.convnext\.layernorm\.weight"):
        conv.segmenter_from_torch({**sd, "backbone.convnext.layernorm.weight": torch.zeros(64)}, cfg)
    key = "backbone.encoder.stages.1.layers.0.dwconv.weight"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        conv.segmenter_from_torch({**sd, key: sd[key][:, :, :5]}, cfg)

    params, stats = conv.segmenter_from_torch(sd, cfg)
    del params["backbone"]["stage_0_block_0"]["layer_scale"]
    with pytest.raises(KeyError, match="params/backbone/stage_0_block_0/layer_scale"):
        conv.segmenter_to_torch(params, stats, cfg)
    params, stats = conv.segmenter_from_torch(sd, cfg)
    params["backbone"]["norm_stem"] = {"scale": jnp.ones(8), "bias": jnp.zeros(8)}
    with pytest.raises(KeyError, match="params/backbone/norm_stem/bias"):
        conv.segmenter_to_torch(params, stats, cfg)

    # Through the directory loader: one-line errors naming the key or the file; pickles are refused.
    from safetensors.torch import save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(case["tcfg"].to_dict()))
    save_file({k: v.contiguous() for k, v in sd.items() if k != "decode_head.classifier.bias"},
              str(bad / "model.safetensors"))
    with pytest.raises(conv.UperNetConversionError, match=r"missing key 'decode_head\.classifier\.bias'"):
        conv.load_transformers_upernet(str(bad))
    os.remove(bad / "model.safetensors")
    (bad / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SdsupError, match="pickle"):
        conv.load_transformers_upernet(str(bad))


def test_convert_writes_an_sdsup_segmenter_dir(case, tmp_path, capsys):
    """`python -m sdsup.convert upernet`: the directory --config.evalseg.pretrained reads."""
    out = str(tmp_path / "seg")
    assert convert_main(["upernet", f"--pretrained={case['directory']}", f"--out={out}"]) == 0
    assert "UperNet-convnext segmenter" in capsys.readouterr().out
    cfg, want = conv.load_transformers_upernet(case["directory"])
    got_cfg, variables = load_model_dir(out, "segmenter")
    assert got_cfg == cfg
    fa, fb = flatten_dict(variables), flatten_dict(want)
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)
    with pytest.raises(conv.UperNetConversionError, match="already holds a model"):
        conv.convert(case["directory"], out)


def test_normalization_from_preprocessor():
    imagenet = (IMAGENET_MEAN, IMAGENET_STD)
    assert conv.normalization_from_preprocessor(PREPROCESSOR) == imagenet
    assert conv.normalization_from_preprocessor({}) == imagenet  # SegformerImageProcessor's defaults
    # mmseg's 0..255 statistics, applied without rescaling.
    mmseg = {"do_rescale": False, "image_mean": [123.675, 116.28, 103.53], "image_std": [58.395, 57.12, 57.375]}
    assert conv.normalization_from_preprocessor(mmseg) == imagenet
    assert conv.normalization_from_preprocessor({"image_mean": 0.5, "image_std": 0.5}) == ((0.5,) * 3, (0.5,) * 3)
    assert conv.normalization_from_preprocessor({"do_normalize": False}) == ((0.0,) * 3, (1.0,) * 3)


def test_layer_scale_off_and_default_out_features():
    # layer_scale_init_value <= 0: transformers builds no gamma; the key sets agree.
    for value in (0.0, -1.0):
        tcfg = _tconfig(False, layer_scale_init_value=value)
        cfg = conv.segmenter_config_from_transformers(tcfg)
        assert cfg.layer_scale_init_value == 0.0
        tkeys = UperNetForSemanticSegmentation(tcfg).state_dict()
        assert {k: tuple(v.shape) for k, v in tkeys.items()} == conv.expected_torch_keys(cfg)
        assert not any("layer_scale" in k for k in tkeys)
    # A ConvNextConfig without out_features outputs only its last stage (transformers' default).
    cfg = conv.segmenter_config_from_transformers(
        {"model_type": "upernet", "use_auxiliary_head": False,
         "backbone_config": {"model_type": "convnext", "hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}})
    assert cfg.feature_stages == ("stage2",)


def test_invalid_configs_raise():
    small = dict(backbone="convnext", hidden_sizes=(8, 16), depths=(1, 1), out_features=("stage1", "stage2"))
    SegmenterConfig(**small)
    with pytest.raises(ValueError, match="embedding_size"):
        SegmenterConfig(**small, embedding_size=32)
    with pytest.raises(ValueError, match="layer_type"):
        SegmenterConfig(**small, layer_type="basic")
    with pytest.raises(ValueError, match="patch_size"):
        SegmenterConfig(patch_size=2)  # a ResNet has no patch size
    with pytest.raises(ValueError, match="layer_scale_init_value"):
        SegmenterConfig(**small, layer_scale_init_value=-1.0)
    with pytest.raises(ValueError, match="backbone"):
        SegmenterConfig(style="csail", backbone="convnext")
    with pytest.raises(ValueError, match="backbone must be one of"):
        SegmenterConfig(backbone="swin")
    with pytest.raises(ValueError, match="gelu"):
        conv.segmenter_config_from_transformers(
            {"model_type": "upernet", "backbone_config": {**BACKBONE, "model_type": "convnext",
                                                          "hidden_act": "relu"}})
    with pytest.raises(ValueError, match="num_stages"):
        conv.segmenter_config_from_transformers(
            {"model_type": "upernet", "backbone_config": {**BACKBONE, "model_type": "convnext", "num_stages": 3}})
    with pytest.raises(ValueError, match="only ResNet and ConvNeXt"):
        conv.segmenter_config_from_transformers({"model_type": "upernet", "backbone_config": {"model_type": "swin"}})


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = conv.segmenter_config_from_transformers(_tconfig(True))
    model = UperNetSegmenter(cfg, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 64, 96, 3), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False)))
    for path, leaf in flatten_dict(variables).items():
        assert leaf.dtype == (jnp.int32 if path[-1] == "num_batches_tracked" else jnp.float32), path
    logits, aux = jax.eval_shape(lambda v: model.apply(v, x, train=False, return_aux=True), variables)
    assert logits.dtype == aux.dtype == jnp.float32
    assert logits.shape == aux.shape == (2, 64, 96, cfg.num_classes)
