"""UperNetSegmenter(style="csail") and sdsup.convert.csail against a PyTorch CSAIL ResNet + UPerNet.

The reference (tests/csail_reference.py) is a re-statement of mit_semseg's
`Resnet` encoder and `UPerNet` decoder written for the tests from the
architecture (not copied). Weights and
BatchNorm statistics are random and non-trivial; both halves are saved with
torch.save and converted from the files.
"""

import dataclasses
import os
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from csail_reference import MOMENTUM, Decoder, Encoder, randomize
from sdsup.convert import csail
from sdsup.convert.__main__ import main as convert_main
from sdsup.models.partitioning import BIAS, CONV_KERNEL, NORM_PARAM
from sdsup.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, SegmenterConfig, UperNetSegmenter
from sdsup.workdir import load_model_dir

ATOL = 1e-4  # float32 logits of O(1-10): absolute tolerance, rtol 0.
STEM, WIDTHS, DEPTHS, FPN, PPM, CLASSES = (8, 8, 16), (16, 32, 64, 128), (1, 1, 2, 1), 16, 8, 5
POOL_SCALES = (1, 2, 3, 6)


def _images(size, seed, batch=2):
    x = np.random.RandomState(seed).uniform(-1.0, 1.0, (batch, *size, 3)).astype(np.float32)
    pv = ((x + 1.0) / 2.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return x, torch.from_numpy(np.ascontiguousarray(pv.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    enc, dec = Encoder(STEM, WIDTHS, DEPTHS), Decoder(WIDTHS, FPN, PPM, CLASSES)
    randomize(enc, dec)
    enc.eval(), dec.eval()
    d = tmp_path_factory.mktemp("csail")
    paths = str(d / "encoder_epoch_50.pth"), str(d / "decoder_epoch_50.pth")
    torch.save(enc.state_dict(), paths[0])
    torch.save(dec.state_dict(), paths[1])
    config, variables = csail.load_csail(*paths)
    return dict(enc=enc, dec=dec, paths=paths, config=config, variables=variables, dir=d)


def _torch_logits(ref, pixel_values):
    with torch.no_grad():
        feats = ref["enc"](pixel_values)
        return _nhwc(ref["dec"](feats, pixel_values.shape[2:])), feats[-1].mean(dim=(2, 3)).numpy()


# ----------------------------------------------------------------- tests


def test_config_is_read_from_the_shapes(ref):
    cfg = ref["config"]
    assert cfg == SegmenterConfig(style="csail", num_classes=CLASSES, stem_channels=STEM, hidden_sizes=WIDTHS,
                                  depths=DEPTHS, layer_type="bottleneck", head_channels=FPN, ppm_channels=PPM,
                                  pool_scales=POOL_SCALES)
    assert cfg.bn_momentum == MOMENTUM


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_eval_logits_match_torch(ref, size):
    cfg, variables = ref["config"], ref["variables"]
    images, pixel_values = _images(size, seed=size[1])
    model = UperNetSegmenter(cfg)

    @jax.jit
    def run(v, x):
        return model.apply(v, x, train=False), model.apply(v, x, method=UperNetSegmenter.pooled_features)

    logits, pooled = run(variables, images)
    want, want_pooled = _torch_logits(ref, pixel_values)
    assert logits.shape == (2, *size, CLASSES) and logits.dtype == jnp.float32
    assert np.abs(want).max() > 0.5  # not a vacuous comparison
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled, rtol=0, atol=ATOL)


def test_converted_tree_is_the_models_tree(ref):
    cfg = ref["config"]
    boxed = jax.eval_shape(lambda: UperNetSegmenter(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                              train=False))
    for path, leaf in flatten_dict(boxed).items():
        expected = {"kernel": CONV_KERNEL, "bias": BIAS if "classifier" in path else NORM_PARAM,
                    "scale": NORM_PARAM, "mean": NORM_PARAM, "var": NORM_PARAM, "num_batches_tracked": ()}
        assert tuple(leaf.names) == expected[path[-1]], path
    want = {k: (v.shape, v.dtype) for k, v in flatten_dict(nn.meta.unbox(boxed)).items()}
    got = {k: (v.shape, v.dtype) for k, v in flatten_dict(ref["variables"]).items()}
    assert got == want


def test_train_mode_matches_torch_and_gradients_flow_with_remat(ref):
    """Batch statistics and the momentum-0.001 running update as torch's train mode; a remat backward."""
    cfg, variables = ref["config"], ref["variables"]
    images, pixel_values = _images((64, 48), seed=3)
    enc, dec = Encoder(STEM, WIDTHS, DEPTHS), Decoder(WIDTHS, FPN, PPM, CLASSES)
    enc.load_state_dict(ref["enc"].state_dict()), dec.load_state_dict(ref["dec"].state_dict())
    enc.train(), dec.train()
    with torch.no_grad():
        want = _nhwc(dec(enc(pixel_values), pixel_values.shape[2:]))
    want_stats = csail.csail_from_torch(enc.state_dict(), dec.state_dict(), cfg)["batch_stats"]

    model = UperNetSegmenter(cfg, remat=True)
    labels = jnp.asarray(np.random.RandomState(0).randint(0, CLASSES, images.shape[:3]))

    def loss(params, x):
        logits, updated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))
        return ce, (logits, updated["batch_stats"])

    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"], images)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=ATOL)
    got, exp, before = flatten_dict(stats), flatten_dict(want_stats), flatten_dict(variables["batch_stats"])
    assert got.keys() == exp.keys()
    for k in exp:
        if k[-1] == "num_batches_tracked":
            assert int(got[k]) == int(exp[k]) == int(before[k]) + 1, k
        else:
            assert not np.array_equal(np.asarray(got[k]), before[k]), k
            np.testing.assert_allclose(np.asarray(got[k]), exp[k], rtol=1e-5, atol=1e-6, err_msg="/".join(k))
    flat = flatten_dict(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in flat.values()), [k for k, g in flat.items()
                                                                        if float(jnp.max(jnp.abs(g))) == 0]


def test_round_trip_is_exact(ref):
    cfg, variables = ref["config"], ref["variables"]
    enc_sd, dec_sd = ref["enc"].state_dict(), ref["dec"].state_dict()
    enc, dec = csail.csail_to_torch(variables, cfg)
    # Same keys in the same order, bitwise the same values (num_batches_tracked int64).
    for got, src in ((enc, enc_sd), (dec, dec_sd)):
        assert list(got) == list(src)
        for k, v in src.items():
            assert got[k].dtype == v.numpy().dtype and np.array_equal(got[k], v.numpy()), k
    # Flax -> torch -> Flax, bitwise; the arrays load strictly into the PyTorch modules.
    back = csail.csail_from_torch(enc, dec, cfg)
    fa, fb = flatten_dict(variables), flatten_dict(back)
    assert fa.keys() == fb.keys()
    assert all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)
    Encoder(STEM, WIDTHS, DEPTHS).load_state_dict({k: torch.from_numpy(v) for k, v in enc.items()}, strict=True)
    Decoder(WIDTHS, FPN, PPM, CLASSES).load_state_dict({k: torch.from_numpy(v) for k, v in dec.items()}, strict=True)

    # mit_semseg's SynchronizedBatchNorm2d buffers: written on request, accepted and dropped on the way in.
    enc_s, dec_s = csail.csail_to_torch(variables, cfg, sync_bn_buffers=True)
    assert "bn1._running_iter" in enc_s and "ppm_conv.0.1._tmp_running_var" in dec_s
    fc = flatten_dict(csail.csail_from_torch(enc_s, dec_s, cfg))
    assert all(np.array_equal(fa[k], fc[k]) for k in fa)
    # Checkpoints from torch < 0.4.1 have no num_batches_tracked: 0.
    old = {k: v for k, v in enc_sd.items() if not k.endswith("num_batches_tracked")}
    stats = flatten_dict(csail.csail_from_torch(old, dec_sd, cfg)["batch_stats"])
    assert int(stats[("backbone", "stem", "conv_0", "norm", "num_batches_tracked")]) == 0


def test_fake_class_is_last_and_leaves_the_others_unchanged(ref):
    cfg, variables = ref["config"], ref["variables"]
    dcfg, dvars = csail.load_csail(*ref["paths"], num_classes=CLASSES, fake_class=True)
    assert dcfg == cfg.with_fake_class() and dcfg.num_classes == CLASSES + 1
    images, _ = _images((32, 32), seed=5)
    logits = jax.jit(lambda v, x: UperNetSegmenter(cfg).apply(v, x, train=False))(variables, images)
    dlogits = jax.jit(lambda v, x: UperNetSegmenter(dcfg).apply(v, x, train=False))(dvars, images)
    assert dlogits.shape == (*logits.shape[:3], CLASSES + 1)
    np.testing.assert_allclose(np.asarray(dlogits[..., :CLASSES]), np.asarray(logits), rtol=0, atol=1e-5)
    assert np.array_equal(np.asarray(dlogits[..., CLASSES]), np.zeros(logits.shape[:3]))  # zero-initialised row
    fd, f = flatten_dict(dvars), flatten_dict(variables)
    assert all(np.array_equal(fd[k], f[k]) for k in f if "classifier" not in k)


def test_errors_name_the_file_and_key(ref):
    cfg = ref["config"]
    enc_sd, dec_sd = dict(ref["enc"].state_dict()), dict(ref["dec"].state_dict())
    d = ref["dir"]

    # A pickled module (not weights_only-loadable) is refused, naming the file; it is never unpickled.
    pickled = str(d / "pickled_model.pth")
    torch.save(ref["enc"], pickled)
    with pytest.raises(csail.CsailConversionError, match=r"encoder file .*pickled_model\.pth .*weights_only"):
        csail.load_csail(pickled, ref["paths"][1])
    plain_pickle = str(d / "plain.pth")
    with open(plain_pickle, "wb") as f:
        pickle.dump({"conv1.weight": np.zeros(3)}, f, protocol=2)
    with pytest.raises(csail.CsailConversionError, match=r"plain\.pth.*weights_only"):
        csail.read_state_dict(plain_pickle, "encoder")

    key = "layer3.1.bn2.running_var"
    with pytest.raises(csail.CsailConversionError, match=r"encoder state dict is missing key 'layer3\.1\.bn2\.running_var'"):
        csail.csail_from_torch({k: v for k, v in enc_sd.items() if k != key}, dec_sd, cfg)
    with pytest.raises(csail.CsailConversionError, match=r"decoder state dict has unexpected key 'conv_last\.2\.weight'"):
        csail.csail_from_torch(enc_sd, {**dec_sd, "conv_last.2.weight": torch.zeros(1)}, cfg)
    key = "fpn_out.1.0.0.weight"
    with pytest.raises(csail.CsailConversionError,
                       match=r"decoder state dict's key 'fpn_out\.1\.0\.0\.weight' has shape \(16, 15, 3, 3\)"):
        csail.csail_from_torch(enc_sd, {**dec_sd, key: dec_sd[key][:, :15]}, cfg)

    # Files swapped, or a decoder that is not UPerNet: the config inference says so.
    with pytest.raises(csail.CsailConversionError, match="swapped"):
        csail.config_from_state_dicts(dec_sd, enc_sd)
    with pytest.raises(csail.CsailConversionError, match="pool_scales"):
        csail.config_from_state_dicts(enc_sd, dec_sd, pool_scales=(1, 2, 3))
    with pytest.raises(csail.CsailConversionError, match="predicts 5 classes"):
        csail.config_from_state_dicts(enc_sd, dec_sd, num_classes=150)

    variables = ref["variables"]
    bad = flatten_dict(variables)
    del bad[("params", "decode_head", "fuse", "norm", "scale")]
    with pytest.raises(csail.CsailConversionError, match="decode_head/fuse/norm/scale"):
        csail.csail_to_torch(unflatten_dict(bad), cfg)
    with pytest.raises(csail.CsailConversionError, match="style='csail'"):
        csail.csail_to_torch(variables, SegmenterConfig())


def test_cli_writes_a_segmenter_directory(ref, capsys):
    out = str(ref["dir"] / "upernet_d")
    enc, dec = ref["paths"]
    assert convert_main(["csail", f"--encoder={enc}", f"--decoder={dec}", f"--out={out}", "--fake_class",
                         "--image_mean=0.5,0.5,0.5", "--image_std=0.5,0.5,0.5"]) == 0
    assert "6 outputs" in capsys.readouterr().out
    config, variables = load_model_dir(out, "segmenter")
    assert config == dataclasses.replace(ref["config"].with_fake_class(), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    want = flatten_dict(csail.add_fake_class(ref["config"], ref["variables"])[1])
    got = flatten_dict(variables)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)

    # Errors are one line; an existing model is not overwritten silently.
    assert convert_main(["csail", f"--encoder={enc}", f"--decoder={dec}", f"--out={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    assert convert_main(["csail", f"--encoder={dec}", f"--decoder={enc}", f"--out={out}x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "swapped" in err and "\n" not in err


def test_cli_keeps_torch_deferred():
    """Importing the converter (and the CLI module) does not import torch."""
    code = "import sys, sdsup.convert.csail, sdsup.convert.__main__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_bfloat16_compute_keeps_float32_params_stats_and_logits(ref):
    model = UperNetSegmenter(ref["config"], remat=True, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 64, 48, 3), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False)))
    for path, leaf in flatten_dict(variables).items():
        assert leaf.dtype == (jnp.int32 if path[-1] == "num_batches_tracked" else jnp.float32), path
    logits, updated = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 64, 48, CLASSES)
    assert jax.tree.map(lambda a: a.dtype, updated["batch_stats"]) == jax.tree.map(
        lambda a: a.dtype, variables["batch_stats"])


def test_style_fields_are_checked():
    with pytest.raises(ValueError, match="style must be one of"):
        SegmenterConfig(style="mmseg")
    with pytest.raises(ValueError, match=r"does not use \['embedding_size', 'use_auxiliary_head'\]"):
        SegmenterConfig(style="csail", embedding_size=32, use_auxiliary_head=True)
    with pytest.raises(ValueError, match=r"does not use \['stem_channels'\]"):
        SegmenterConfig(stem_channels=(8, 8, 16))
    cfg = SegmenterConfig(style="csail", stem_channels=[8, 16], hidden_sizes=[16, 32], depths=[1, 1])
    assert cfg.stem_channels == (8, 16) and cfg.stage_channels == (16, 16, 32) and cfg.bn_momentum == MOMENTUM
    assert SegmenterConfig().bn_momentum == 0.1
