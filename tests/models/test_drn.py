"""DRNSegmenter and sdsup.convert.drn against a PyTorch fyu/drn DRN-D + DRNSeg.

The reference below is a re-statement of fyu/drn's `DRN(arch="D")` and
`segment.py`'s `DRNSeg` written for this test from the architecture (not
copied): 7x7 stem, conv-BN-ReLU layers 1/2/7/8, Bottleneck or BasicBlock
layers 3-6 (strides 2, 2, 1, 1; dilations 1, 1, 2, 4), a 1x1 classifier and
the bilinear depthwise ConvTranspose2d(16, stride 8, padding 4). `base` is
an nn.Sequential of layer0..layer8, so its state_dict keys are the real
file's (`base.0.0.weight`, `base.5.0.conv1.weight`, `seg.weight`,
`up.weight`). Weights and BatchNorm statistics are random and non-trivial;
the state dict is saved with torch.save and converted from the file.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from drn_reference import BasicBlock, TorchDRNSeg, randomize
from sdsup.convert import drn as cdrn
from sdsup.convert.__main__ import main as convert_main
from sdsup.evaluation import images as image_evaluation
from sdsup.models.drn import CITYSCAPES_MEAN, CITYSCAPES_STD, DRNConfig, DRNSegmenter, abstract_variables
from sdsup.workdir import SEGMENTER_KINDS, load_model_dir

ATOL = 1e-4  # float32 logits of O(10) (max |diff| seen: 1.5e-5): absolute tolerance, rtol 0.
CHANNELS, DEPTHS, CLASSES = (4, 8, 8, 16, 16, 32, 32, 32), (1, 1, 1, 1, 1, 1, 1, 1), 5


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _torch_input(images, mean=CITYSCAPES_MEAN, std=CITYSCAPES_STD):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x + 1) / 2 - m) / s


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(TorchDRNSeg(CHANNELS, DEPTHS, CLASSES))
    path = str(tmp_path_factory.mktemp("drn") / "drn_toy.pth")
    torch.save(model.state_dict(), path)
    config, variables = cdrn.load_drn(path)
    return model, path, config, variables


def _apply(config, variables, images, **kw):
    return jax.jit(lambda v, x: DRNSegmenter(config).apply(v, x, **kw))(variables, images)


# ----------------------------------------------------------------- numerics


@pytest.mark.parametrize("shape", [(2, 64, 48, 3), (1, 32, 64, 3)])
def test_logits_match_pytorch(reference, shape):
    model, _, config, variables = reference
    assert config == DRNConfig(num_classes=CLASSES, channels=CHANNELS, depths=DEPTHS)
    images = _images(shape, seed=shape[1])
    with torch.no_grad():
        want = model(_torch_input(images)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(_apply(config, variables, images))
    assert got.shape == shape[:3] + (CLASSES,) == want.shape
    assert np.abs(want).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_pooled_features_match_pytorch(reference):
    model, _, config, variables = reference
    images = _images((2, 64, 48, 3), seed=7)
    with torch.no_grad():
        stages = [s.mean(dim=(2, 3)).numpy() for s in model.stages(_torch_input(images))]
    pooled = jax.jit(lambda v, x: DRNSegmenter(config).apply(v, x, method=DRNSegmenter.pooled_features))
    pooled_all = jax.jit(lambda v, x: DRNSegmenter(config).apply(
        v, x, all_stages=True, method=DRNSegmenter.pooled_features))
    np.testing.assert_allclose(np.asarray(pooled(variables, images)), stages[-1], rtol=0, atol=ATOL)
    got = np.asarray(pooled_all(variables, images))
    assert got.shape == (2, sum(config.layer_channels[2:]))
    np.testing.assert_allclose(got, np.concatenate(stages[2:], -1), rtol=0, atol=ATOL)


def test_basic_block_variant_matches_pytorch(tmp_path):
    """drn_d_22/38-style BasicBlock layers (a different key set) convert and agree too."""
    model = randomize(TorchDRNSeg(CHANNELS, (1, 1, 2, 1, 1, 1, 2, 1), CLASSES, block=BasicBlock), seed=1)
    path = str(tmp_path / "drn_basic.pth")
    torch.save(model.state_dict(), path)
    config, variables = cdrn.load_drn(path)
    assert (config.block, config.depths) == ("basic", (1, 1, 2, 1, 1, 1, 2, 1))
    images = _images((1, 32, 40, 3), seed=3)
    with torch.no_grad():
        want = model(_torch_input(images)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(_apply(config, variables, images)), want, rtol=0, atol=ATOL)


def test_gradients_flow_and_bad_sizes(reference):
    _, _, config, variables = reference
    images = _images((1, 32, 32, 3), seed=5)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(DRNSegmenter(config).apply(variables, x)[..., 1])))(images)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    with pytest.raises(ValueError, match="multiples of 8"):
        DRNSegmenter(config).apply(variables, jnp.zeros((1, 36, 32, 3)))


# ----------------------------------------------------------------- conversion


def test_round_trip_exact(reference):
    model, _, config, variables = reference
    want = model.state_dict()
    got = cdrn.drn_to_torch(config, variables)
    assert list(got) == list(want)  # same keys, torch's order
    for key, value in want.items():
        assert got[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
    fresh = TorchDRNSeg(CHANNELS, DEPTHS, CLASSES)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=True)
    # And back: the same variables.
    again = cdrn.drn_from_torch(got, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, jax.tree_util.tree_map(np.asarray, variables))
    # The converted tree holds exactly the variables DRNSegmenter.init makes, with their shapes.
    boxed = abstract_variables(config)
    flat_abstract = {k: v.shape for k, v in cdrn.flatten(nn.meta.unbox(dict(boxed))).items()}
    flat_conv = {k: np.shape(v) for k, v in cdrn.flatten(variables).items()}
    assert flat_abstract == flat_conv


def test_checkpoint_dict_module_prefix_and_legacy_format(reference, tmp_path):
    """segment.py's checkpoints: {"state_dict": DataParallel keys, "epoch", ...}; old files lack num_batches_tracked."""
    model, _, config, variables = reference
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = str(tmp_path / "checkpoint_latest.pth.tar")
    torch.save({"epoch": 500, "arch": "drn_d_105", "best_prec1": 75.6,
                "state_dict": {"module." + k: v for k, v in sd.items()}}, path, _use_new_zipfile_serialization=False)
    config2, variables2 = cdrn.load_drn(path)
    assert config2 == config
    flat, flat2 = cdrn.flatten(variables), cdrn.flatten(variables2)
    assert set(flat) == set(flat2)
    for key in flat:
        if key[-1] == "num_batches_tracked":
            assert int(flat2[key]) == 0
        else:
            np.testing.assert_array_equal(flat2[key], flat[key])


def test_overrides(reference):
    _, path, config, _ = reference
    c, _ = cdrn.load_drn(path, image_mean=(0.5, 0.5, 0.5), image_std=[0.5, 0.5, 0.5], num_classes=CLASSES)
    assert (c.image_mean, c.image_std, c.depths) == ((0.5,) * 3, (0.5,) * 3, DEPTHS)
    with pytest.raises(cdrn.DRNConversionError, match="num_classes=19 was asked for but the checkpoint has "
                                                      "num_classes=5"):
        cdrn.load_drn(path, num_classes=19)
    with pytest.raises(cdrn.DRNConversionError, match="unknown DRNConfig field"):
        cdrn.load_drn(path, width=3)


def _save(tmp_path, sd, name="bad.pth"):
    path = str(tmp_path / name)
    torch.save(sd, path)
    return path


def test_bad_files_give_clear_errors(reference, tmp_path):
    model, _, _, _ = reference
    sd = model.state_dict()
    err = cdrn.DRNConversionError

    missing = {k: v for k, v in sd.items() if k != "base.5.0.bn2.running_var"}
    with pytest.raises(err, match=r"missing key 'base\.5\.0\.bn2\.running_var'"):
        cdrn.load_drn(_save(tmp_path, missing))

    extra = dict(sd, **{"base.5.0.conv4.weight": torch.zeros(1)})
    with pytest.raises(err, match=r"unexpected key 'base\.5\.0\.conv4\.weight'"):
        cdrn.load_drn(_save(tmp_path, extra))

    wrong = dict(sd, **{"base.6.0.conv2.weight": torch.zeros(32, 32, 3, 1)})
    with pytest.raises(err, match=r"'base\.6\.0\.conv2\.weight' has shape \(32, 32, 3, 1\), expected \(32, 32, 3, 3\)"):
        cdrn.load_drn(_save(tmp_path, wrong))

    not_bilinear = dict(sd, **{"up.weight": sd["up.weight"] * 1.01})
    with pytest.raises(err, match="not fyu/drn's fixed bilinear"):
        cdrn.load_drn(_save(tmp_path, not_bilinear))

    torch_up = {k: v for k, v in sd.items() if k != "up.weight"}
    with pytest.raises(err, match="missing key 'up.weight'.*use_torch_up"):
        cdrn.load_drn(_save(tmp_path, torch_up))

    pickled = _save(tmp_path, TorchDRNSeg(CHANNELS, DEPTHS, CLASSES), "whole_model.pth")  # a pickled module: needs a full unpickle
    with pytest.raises(err, match=r"whole_model\.pth could not be read with torch\.load\(weights_only=True\)"):
        cdrn.load_drn(pickled)

    with pytest.raises(err, match="does not exist"):
        cdrn.load_drn(str(tmp_path / "nope.pth"))

    mixed = dict(sd, **{"module.seg.bias": sd["seg.bias"]})
    with pytest.raises(err, match="start with 'module.' and others do not"):
        cdrn.load_drn(_save(tmp_path, mixed))

    with pytest.raises(err, match="no 'base.\\*' keys"):
        cdrn.load_drn(_save(tmp_path, {"layer0.0.weight": torch.zeros(16, 3, 7, 7)}))


def test_variables_errors(reference):
    _, _, config, variables = reference
    flat = dict(cdrn.flatten(variables))
    del flat[("params", "seg", "bias")]
    with pytest.raises(cdrn.DRNConversionError, match="missing variable 'params/seg/bias'"):
        cdrn.drn_to_torch(config, cdrn.unflatten(flat))
    flat = {**cdrn.flatten(variables), ("params", "extra", "kernel"): np.zeros(1)}
    with pytest.raises(cdrn.DRNConversionError, match="unexpected variable 'params/extra/kernel'"):
        cdrn.drn_to_torch(config, cdrn.unflatten(flat))


# ----------------------------------------------------------------- real size


def test_drn_d_105_size():
    """drn_d_105 / 19 classes: the config the real file gives, its keys and its parameter count (never run)."""
    with torch.device("meta"):
        real = TorchDRNSeg(channels=(16, 32, 64, 128, 256, 512, 512, 512), depths=(1, 1, 3, 4, 23, 3, 1, 1),
                           classes=19)
    sd = real.state_dict()
    assert cdrn.config_from_state_dict(sd) == DRNConfig()
    assert cdrn.expected_torch_keys(DRNConfig()) == {
        k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch_params = sum(p.numel() for p in real.parameters())  # includes the fixed up.weight
    up = real.up.weight.numel()
    abstract = abstract_variables(DRNConfig(), 64, 64)
    flax_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        nn.meta.unbox(abstract["params"])))
    assert flax_params == torch_params - up == 54_298_051  # fyu/drn README: 54.8M with the 1000-class fc instead of seg
    assert abstract["batch_stats"]["base"]["layer5_22"]["bn3"]["mean"].value.shape == (1024,)


# ----------------------------------------------------------------- in sdsup


def test_cli_writes_an_evaluator_the_evaluation_uses(reference, tmp_path, capsys):
    """`python -m sdsup.convert drn` -> a model dir for --config.evalseg.pretrained; the image evaluation's
    Segmenter predicts with it and takes its pooled features."""
    model, path, config, _ = reference
    out = str(tmp_path / "drn")
    assert convert_main(["drn", f"--checkpoint={path}", f"--out={out}"]) == 0
    assert "DRN-D segmenter" in capsys.readouterr().out
    loaded_config, variables = load_model_dir(out, SEGMENTER_KINDS)
    assert loaded_config == config
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    segmenter = image_evaluation.Segmenter(loaded_config, variables)
    with torch.no_grad():
        want = model(_torch_input(images.astype(np.float32) / 127.5 - 1.0)).argmax(1).numpy()
    got = segmenter.predict(images)
    assert got.shape == (2, 32, 48) and np.mean(got == want) > 0.99
    assert segmenter.features(images).shape == (2, sum(config.layer_channels[2:]))
    assert convert_main(["drn", f"--checkpoint={path}", f"--out={out}"]) == 1  # never overwritten unasked
    assert "already holds a model" in capsys.readouterr().err
