"""Inception-v3 (both variants) against a PyTorch reference; weight conversion, its CLI and the FID extractor.

The PyTorch reference is written here, in torch.nn, with torchvision's
module names, because torchvision cannot be imported in this environment:
the only torchvision wheel the machines can install (0.28.0 from PyPI) is a
CUDA build whose C extension does not load next to the CPU build of torch,
and once installed it also breaks `import transformers` models for the rest
of the suite. `TorchInception("torchvision")` follows torchvision 0.28.0's
`inception_v3(aux_logits=False)` (Inception3 with BasicConv2d and
InceptionA-E); `TorchInception("fid")` makes pytorch-fid's four changes
(1008 classes, average pools that do not count padding in the A, C and first
E blocks, a max pool in the last E block). Both were checked against real
torchvision 0.28.0 (its pure-Python model code loaded in isolation, outside
the venv): the state dicts load strictly into
`inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=N)`
with the same keys in the same order and the same parameter count, and the
logits are bitwise equal, for "fid" after re-routing the pool branches of
torchvision's own blocks as pytorch-fid does. `test_reference_is_torchvision`
repeats that check wherever torchvision imports.

Weights are random with O(1) activations throughout (He-normal convolutions,
random BatchNorm affine parameters and running statistics; fresh 0/1
statistics would make BatchNorm an identity), so the 1e-4 tolerance is ~1e-4
relative to the features (|max| ~2). Measured: ~3e-6 on features and ~1e-6
on logits; what remains is float32 summation order in the convolutions.
"""

import hashlib
import importlib.util
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import load_file

from sdsup.convert import inception as conv
from sdsup.convert.inception import InceptionConversionError, inception_from_torch, inception_to_torch
from sdsup.errors import SdsupError
from sdsup.evaluation import fid
from sdsup.models import io as model_io
from sdsup.models.inception import InceptionConfig, InceptionInputError, InceptionV3, preprocess
from sdsup.models.partitioning import CONV_KERNEL, DENSE_KERNEL, NORM_PARAM
from sdsup.models.segmenter import SegmenterConfig

torch.set_num_threads(1)

ATOL = 1e-4
# torchvision 0.28.0, sum(p.numel() for p in inception_v3(weights=None, aux_logits=False,
# init_weights=False).parameters()), measured. Its docs' 27,161,264 includes the
# auxiliary classifier (3,326,696 parameters), which FID never uses.
TORCHVISION_PARAMS = 23_834_568


# ----------------------------------------------------------------------------- PyTorch reference


class _BasicConv2d(torch.nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x, kind):
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=(kind == "avg"))


class _Block(torch.nn.Module):
    """A module whose BasicConv2d children are added by name (`add`) and chained by name (`run`)."""

    def add(self, name, *args, **kwargs):
        setattr(self, name, _BasicConv2d(*args, **kwargs))

    def run(self, x, *names):
        for n in names:
            x = getattr(self, n)(x)
        return x


class _A(_Block):
    def __init__(self, cin, pool_features, pool):
        super().__init__()
        self.pool = pool
        self.add("branch1x1", cin, 64, 1)
        self.add("branch5x5_1", cin, 48, 1)
        self.add("branch5x5_2", 48, 64, 5, padding=2)
        self.add("branch3x3dbl_1", cin, 64, 1)
        self.add("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.add("branch3x3dbl_3", 96, 96, 3, padding=1)
        self.add("branch_pool", cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.run(x, "branch1x1"), self.run(x, "branch5x5_1", "branch5x5_2"),
                          self.run(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                          self.branch_pool(_pool3x3(x, self.pool))], 1)


class _B(_Block):
    def __init__(self, cin):
        super().__init__()
        self.add("branch3x3", cin, 384, 3, stride=2)
        self.add("branch3x3dbl_1", cin, 64, 1)
        self.add("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.add("branch3x3dbl_3", 96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.run(x, "branch3x3"), self.run(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _C(_Block):
    def __init__(self, cin, c7, pool):
        super().__init__()
        self.pool = pool
        self.add("branch1x1", cin, 192, 1)
        self.add("branch7x7_1", cin, c7, 1)
        self.add("branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
        self.add("branch7x7_3", c7, 192, (7, 1), padding=(3, 0))
        self.add("branch7x7dbl_1", cin, c7, 1)
        self.add("branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
        self.add("branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
        self.add("branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
        self.add("branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))
        self.add("branch_pool", cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.run(x, "branch1x1"), self.run(x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                          self.run(x, *[f"branch7x7dbl_{i}" for i in range(1, 6)]),
                          self.branch_pool(_pool3x3(x, self.pool))], 1)


class _D(_Block):
    def __init__(self, cin):
        super().__init__()
        self.add("branch3x3_1", cin, 192, 1)
        self.add("branch3x3_2", 192, 320, 3, stride=2)
        self.add("branch7x7x3_1", cin, 192, 1)
        self.add("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3))
        self.add("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0))
        self.add("branch7x7x3_4", 192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.run(x, "branch3x3_1", "branch3x3_2"),
                          self.run(x, *[f"branch7x7x3_{i}" for i in range(1, 5)]), F.max_pool2d(x, 3, stride=2)], 1)


class _E(_Block):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.add("branch1x1", cin, 320, 1)
        self.add("branch3x3_1", cin, 384, 1)
        self.add("branch3x3_2a", 384, 384, (1, 3), padding=(0, 1))
        self.add("branch3x3_2b", 384, 384, (3, 1), padding=(1, 0))
        self.add("branch3x3dbl_1", cin, 448, 1)
        self.add("branch3x3dbl_2", 448, 384, 3, padding=1)
        self.add("branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1))
        self.add("branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0))
        self.add("branch_pool", cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.run(x, "branch3x3dbl_1", "branch3x3dbl_2")
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(_pool3x3(x, self.pool))], 1)


class TorchInception(_Block):
    """forward(x NCHW in [-1, 1]) -> (pool3 features [B, 2048], logits)."""

    def __init__(self, variant, num_classes):
        super().__init__()
        fid_ = variant == "fid"
        avg = "avg_valid" if fid_ else "avg"
        self.add("Conv2d_1a_3x3", 3, 32, 3, stride=2)
        self.add("Conv2d_2a_3x3", 32, 32, 3)
        self.add("Conv2d_2b_3x3", 32, 64, 3, padding=1)
        self.add("Conv2d_3b_1x1", 64, 80, 1)
        self.add("Conv2d_4a_3x3", 80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32, avg), _A(256, 64, avg), _A(288, 64, avg)
        self.Mixed_6a = _B(288)
        self.Mixed_6b, self.Mixed_6c = _C(768, 128, avg), _C(768, 160, avg)
        self.Mixed_6d, self.Mixed_6e = _C(768, 160, avg), _C(768, 192, avg)
        self.Mixed_7a = _D(768)
        self.Mixed_7b, self.Mixed_7c = _E(1280, avg), _E(2048, "max" if fid_ else "avg")
        self.fc = torch.nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.run(x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), 3, stride=2)
        x = F.max_pool2d(self.run(x, "Conv2d_3b_1x1", "Conv2d_4a_3x3"), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean(dim=(2, 3))
        return pool, self.fc(pool)


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                gain = 2.0 if isinstance(m, torch.nn.Conv2d) else 1.0  # He for conv + ReLU
                m.weight.normal_(0.0, (gain / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.2)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
    return model.eval()


def _state_dict_numpy(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


CONFIGS = {"torchvision": InceptionConfig.torchvision(), "fid": InceptionConfig.fid()}


@pytest.fixture(scope="module")
def refs():
    """variant -> (torch model, Flax variables); the two share every weight but the classifier."""
    out = {}
    for variant, cfg in CONFIGS.items():
        model = _randomize(TorchInception(variant, cfg.num_classes), seed=0)
        out[variant] = (model, inception_from_torch(model.state_dict(), cfg))
    return out


@pytest.fixture(scope="module")
def images():
    # Non-square and small (>= 75): 107x83 leaves Mixed_7 a 2x1 map, so every
    # padded pooling window and kernel orientation is exercised.
    x = np.random.default_rng(1).uniform(-1.0, 1.0, (2, 107, 83, 3)).astype(np.float32)
    return x, torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _flax_apply(cfg):
    model = InceptionV3(cfg)
    return jax.jit(lambda v, x: model.apply(v, x, return_logits=True))


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_matches_torch(refs, images, variant):
    tmodel, variables = refs[variant]
    x, xt = images
    with torch.no_grad():
        want_pool, want_logits = (t.numpy() for t in tmodel(xt))
    pool, logits = _flax_apply(CONFIGS[variant])(variables, jnp.asarray(x))
    assert pool.shape == (2, 2048) and logits.shape == (2, CONFIGS[variant].num_classes)
    assert pool.dtype == jnp.float32 and logits.dtype == jnp.float32
    d_pool = float(np.max(np.abs(np.asarray(pool) - want_pool)))
    d_logits = float(np.max(np.abs(np.asarray(logits) - want_logits)))
    print(f"{variant}: max|diff| pool {d_pool:.2e} (|max| {np.abs(want_pool).max():.2f}), "
          f"logits {d_logits:.2e} (|max| {np.abs(want_logits).max():.2f})")
    assert 0.1 < np.abs(want_pool).max() < 10.0  # the tolerance below means something at this scale
    assert d_pool <= ATOL and d_logits <= ATOL


def test_variants_differ(refs, images):
    """The variant flag matters on these inputs: same weights, pool features far apart."""
    _, xt = images
    with torch.no_grad():
        a = refs["fid"][0](xt)[0].numpy()
        b = refs["torchvision"][0](xt)[0].numpy()
    assert np.max(np.abs(a - b)) > 100 * ATOL


def test_preprocess_matches_torch_interpolate():
    u8 = np.random.default_rng(2).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    got = np.asarray(jax.jit(preprocess)(jnp.asarray(u8)))
    t = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    want = (2.0 * F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1.0).numpy()
    assert got.shape == (2, 299, 299, 3)
    # The taps are torch's bit for bit; the blend's float32 rounding differs
    # (torch contracts it into fused multiply-adds): measured 3.6e-7.
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
    print(f"preprocess vs torch interpolate: max|diff| {np.abs(got - want.transpose(0, 2, 3, 1)).max():.2e}")
    same = np.random.default_rng(3).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(preprocess(jnp.asarray(same))),
                                  2.0 * (same.astype(np.float32) / np.float32(255.0)) - 1.0)
    with pytest.raises(InceptionInputError, match="uint8"):
        preprocess(jnp.zeros((1, 8, 8, 3), jnp.float32))
    with pytest.raises(InceptionInputError, match=r"\[B, H, W, 3\]"):
        preprocess(jnp.zeros((8, 8, 3), jnp.uint8))


def test_inception_extractor_end_to_end(refs, tmp_path):
    """uint8 scenes-sized images -> 299 -> FID-variant pool3, from a model dir, against torch (pytorch-fid's path)."""
    tmodel, variables = refs["fid"]
    model_io.save(str(tmp_path / "inception"), "inception", CONFIGS["fid"], variables)
    extractor = fid.inception_extractor(str(tmp_path / "inception"), batch_size=2)
    u8 = np.random.default_rng(4).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    got = extractor(u8)  # a full and a padded batch
    t = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
        want = tmodel(2.0 * F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1.0)[0].numpy()
    d = float(np.max(np.abs(got - want)))
    print(f"fid extractor at 299x299: max|diff| {d:.2e} (|max| {np.abs(want).max():.2f})")
    assert got.shape == (3, 2048) and d <= ATOL
    model_io.save(str(tmp_path / "segmenter"), "segmenter", SegmenterConfig(), {"params": {"x": np.zeros(1)}})
    with pytest.raises(SdsupError, match="not an Inception"):
        fid.inception_extractor(str(tmp_path / "segmenter"))


def test_clean_fid_resize(refs, tmp_path):
    """evaluate.fid_resize="clean": clean-fid's per-channel float32 PIL bicubic (antialiased) to 299, clipped, then
    the TF graph's (x - 128) / 128."""
    _, variables = refs["fid"]
    u8 = np.random.default_rng(5).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    resized = fid.clean_resize(u8, 299)
    assert resized.shape == (2, 299, 299, 3) and resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 255.0
    channel = Image.fromarray(u8[1, :, :, 2].astype(np.float32), mode="F").resize((299, 299), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(resized[1, :, :, 2], np.clip(np.asarray(channel), 0, 255))
    flat = fid.clean_resize(np.full((1, 40, 40, 3), 77, np.uint8), 299)
    np.testing.assert_allclose(flat, 77.0, atol=1e-3)  # a constant image stays constant
    model_io.save(str(tmp_path / "inception"), "inception", CONFIGS["fid"], variables)
    clean = fid.inception_extractor(str(tmp_path / "inception"), batch_size=2, resize="clean")
    want = InceptionV3(CONFIGS["fid"]).apply(variables, (jnp.asarray(resized) - 128.0) / 128.0)
    np.testing.assert_allclose(clean(u8), np.asarray(want), rtol=0, atol=1e-5)
    torch_like = fid.inception_extractor(str(tmp_path / "inception"), batch_size=2)
    assert np.abs(clean(u8) - torch_like(u8)).max() > 1e-3  # the two conventions do differ
    with pytest.raises(SdsupError, match="unknown FID resize"):
        fid.inception_extractor(str(tmp_path / "inception"), resize="bilinear")


def test_input_errors():
    model = InceptionV3(CONFIGS["fid"])
    with pytest.raises(InceptionInputError, match="at least 75x75"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 74, 80, 3)))
    with pytest.raises(InceptionInputError, match=r"\[B, H, W, 3\]"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 80, 80, 1)))
    with pytest.raises(ValueError, match="variant"):
        InceptionConfig(variant="tf")


# ----------------------------------------------------------------------------- parameters


def test_parameter_count_and_axes():
    for variant, cfg in CONFIGS.items():
        boxed = jax.eval_shape(InceptionV3(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))
        n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nn.meta.unbox(boxed["params"])))
        torch_n = sum(p.numel() for p in TorchInception(variant, cfg.num_classes).parameters())
        assert n == torch_n == TORCHVISION_PARAMS + (cfg.num_classes - 1000) * 2049
        p = boxed["params"]
        assert p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].names == CONV_KERNEL
        assert p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].value.shape == (1, 7, 128, 128)
        assert p["Conv2d_1a_3x3"]["bn"]["scale"].names == NORM_PARAM
        assert boxed["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"].names == NORM_PARAM
        assert p["fc"]["kernel"].names == DENSE_KERNEL


def test_round_trips_bitwise(refs):
    tmodel, variables = refs["fid"]
    cfg = CONFIGS["fid"]
    sd = inception_to_torch(variables, cfg)
    back = inception_from_torch(sd, cfg)
    flat_a, flat_b = conv.flatten(variables), conv.flatten(back)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert flat_a[k].dtype == flat_b[k].dtype == np.float32
        assert np.array_equal(flat_a[k], flat_b[k]), k
    original = _state_dict_numpy(tmodel)
    assert sd.keys() == original.keys() == set(conv.expected_torch_keys(cfg))
    for k, v in original.items():
        if k.endswith("num_batches_tracked"):
            assert sd[k].dtype == np.int64 and sd[k].shape == () and sd[k] == 0  # not kept: inference only
        else:
            assert np.array_equal(sd[k], v), k
    # What torch itself accepts, strictly.
    fresh = TorchInception("fid", 1008)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)


def test_conversion_errors(refs):
    tmodel, variables = refs["torchvision"]
    cfg = CONFIGS["torchvision"]
    sd = _state_dict_numpy(tmodel)

    def fails(state_dict, match, config=cfg):
        with pytest.raises(InceptionConversionError, match=match):
            inception_from_torch(state_dict, config)

    fails({k: v for k, v in sd.items() if k != "Mixed_6c.branch7x7dbl_3.bn.running_var"},
          r"missing key 'Mixed_6c\.branch7x7dbl_3\.bn\.running_var'")
    fails({**sd, "Mixed_8a.conv.weight": np.zeros(3, np.float32)}, r"unexpected key 'Mixed_8a\.conv\.weight'")
    fails({**sd, "Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3), np.float32)},
          r"'Mixed_5b\.branch5x5_2\.conv\.weight' has shape \(64, 48, 3, 3\), expected \(64, 48, 5, 5\)")
    fails(sd, r"'fc\.weight' has shape \(1000, 2048\).*num_classes=1000", config=CONFIGS["fid"])
    fails({**sd, "fc.bias": np.zeros(1000, np.int64)}, "'fc.bias' has dtype int64")
    # The training-only auxiliary classifier and BatchNorm counters are dropped.
    notes = []
    with_aux = {**sd, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}
    got = inception_from_torch({k: v for k, v in with_aux.items() if "num_batches" not in k}, cfg, log=notes.append)
    assert np.array_equal(got["params"]["fc"]["kernel"], sd["fc.weight"].T)
    assert notes and "AuxLogits" in notes[0]
    # The other direction names the Flax variable.
    broken = {"params": dict(variables["params"]), "batch_stats": variables["batch_stats"]}
    del broken["params"]["Mixed_7c"]
    with pytest.raises(InceptionConversionError, match="missing variable 'params/Mixed_7c/"):
        inception_to_torch(broken, cfg)
    assert issubclass(InceptionConversionError, SdsupError)


# ----------------------------------------------------------------------------- files and CLI


def test_cli_import_export(refs, tmp_path, capsys):
    tmodel, variables = refs["fid"]
    raw = tmp_path / "weights.pth"
    torch.save(tmodel.state_dict(), raw)
    # A torch-hub style name carries the start of the file's SHA-256, as pytorch-fid's does.
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    pth = tmp_path / f"pt_inception-test-{digest[:8]}.pth"
    os.replace(raw, pth)
    out = tmp_path / "model"
    assert conv.main([f"--torch_weights={pth}", f"--out={out}"]) == 0
    kind, config, loaded, extra = model_io.load(str(out))
    assert kind == "inception" and config == CONFIGS["fid"]
    assert extra["source"] == {"file": pth.name, "sha256": digest}
    for k, v in conv.flatten(variables).items():
        assert np.array_equal(conv.flatten(loaded)[k], v), k
    assert json.load(open(out / "config.json"))["config"]["variant"] == "fid"

    # Export to safetensors and back in through the safetensors reader.
    st = tmp_path / "export" / "inception.safetensors"
    assert conv.main([f"--from_model={out}", f"--torch_out={st}"]) == 0
    exported = load_file(str(st))
    for k, v in _state_dict_numpy(tmodel).items():
        if not k.endswith("num_batches_tracked"):
            assert np.array_equal(exported[k], v), k
    out2 = tmp_path / "model2"
    assert conv.main([f"--torch_weights={st}", f"--out={out2}", "--variant=fid"]) == 0
    assert conv.main([f"--torch_weights={st}", f"--out={out2}"]) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "corrupt", "hash", "pickled_model", "not_state_dict", "wrong_ext",
                                  "classes", "bad_safetensors"])
def test_cli_file_errors(tmp_path, capsys, case):
    path = tmp_path / "w.pth"
    expect = {
        "missing": "does not exist",
        "corrupt": "weights_only=True",
        "hash": "SHA-256",
        "pickled_model": "not a pickled model|weights_only",
        "not_state_dict": "not a state dict",
        "wrong_ext": "unknown weights format",
        "classes": "variant cannot be guessed",
        "bad_safetensors": "not a readable safetensors",
    }[case]
    if case == "corrupt":
        path.write_bytes(os.urandom(256))
    elif case == "hash":
        path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
        torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    elif case == "pickled_model":
        torch.save(torch.nn.Linear(2, 2), path)
    elif case == "not_state_dict":
        torch.save([torch.zeros(2)], path)
    elif case == "wrong_ext":
        path = tmp_path / "w.onnx"
        path.write_bytes(b"x")
    elif case == "classes":
        torch.save({"fc.weight": torch.zeros(10, 2048)}, path)
    elif case == "bad_safetensors":
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"\x00" * 16)
    assert conv.main([f"--torch_weights={path}", f"--out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(expect, err), err
    assert not (tmp_path / "out" / "params.safetensors").exists()


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit):
        conv.main(["--torch_weights=x.pth"])
    assert "either --torch_weights and --out" in capsys.readouterr().err


def _importable_torchvision():
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        from torchvision.models import inception
    except Exception:  # the CUDA wheel next to CPU torch: see the module docstring
        return None
    return inception


@pytest.mark.skipif(_importable_torchvision() is None, reason="torchvision is not importable here")
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_reference_is_torchvision(refs, images, variant):
    """The reference is torchvision's network bitwise; for "fid", with pool branches re-routed as pytorch-fid does."""
    tvi = _importable_torchvision()
    tv = tvi.inception_v3(weights=None, aux_logits=False, init_weights=False,
                          num_classes=CONFIGS[variant].num_classes).eval()
    if variant == "fid":
        def rerouted(cls, kind):
            class Block(cls):
                def _forward(self, x):
                    outs = super()._forward(x)
                    outs[-1] = self.branch_pool(_pool3x3(x, kind))
                    return outs
            return Block

        for names, cls, kind in ((("Mixed_5b", "Mixed_5c", "Mixed_5d"), tvi.InceptionA, "avg_valid"),
                                 (("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), tvi.InceptionC, "avg_valid"),
                                 (("Mixed_7b",), tvi.InceptionE, "avg_valid"), (("Mixed_7c",), tvi.InceptionE, "max")):
            for name in names:
                getattr(tv, name).__class__ = rerouted(cls, kind)
    tmodel, _ = refs[variant]
    tv.load_state_dict(tmodel.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(tv(images[1]), tmodel(images[1])[1])
